"""results.json -> a Markdown report and PNG plots (matplotlib, the `bench` extra).

    .venv/bin/python bench/report.py docs/benchmarks/results.json   # redraw from saved results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "vllm": "vllm serve (direct)",
    "litellm": "LiteLLM -> vllm serve",
    "fleet": "fleet (gateway + engine)",
    "offline": "vLLM offline LLM.generate",
    "fleet-null": "fleet gateway -> null engine",
    "litellm-stub": "LiteLLM -> instant stub",
}
ORDER = ["offline", "vllm", "fleet", "litellm", "fleet-null", "litellm-stub"]
CDF_POINTS = [*range(100), 99.5, 99.9, 100]


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _q(d: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    return _f((d or {}).get(key), digits)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _point(points: list[dict[str, Any]] | None, c: int) -> dict[str, Any] | None:
    return next((p for p in points or [] if p.get("concurrency") == c), None)


def markdown(r: dict[str, Any]) -> str:
    meta = r["meta"]
    m = meta["machine"]
    plan = meta["plan"]
    lines = [
        f"# Benchmark results ({meta['mode']} run, {meta['started']})",
        "",
        f"Machine: {m['cpu'] or 'unknown CPU'}, {m['usable_cores']} usable cores, {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}; fleet {m['fleet_commit']}; vLLM {meta['versions'].get('vllm')}, "
        f"LiteLLM {meta['versions'].get('litellm') or '-'}. Whole run: {meta.get('duration_s', '-')} s.",
        "",
    ]
    if meta.get("systems_from"):
        runs = {}
        for name, when in meta["systems_from"].items():
            runs.setdefault(when, []).append(LABELS.get(name, name))
        lines += ["Merged from several runs (`--update`): " + "; ".join(f"{when}: {', '.join(n)}" for when, n in runs.items()) + ".", ""]
    if r.get("targets"):
        lines += ["## Targets", "", "| target | goal | measured | result | detail |", "| --- | --- | --- | --- | --- |"]
        for t in r["targets"]:
            mark = {True: "pass", False: "**miss**", None: "not measured"}[t["pass"]]
            lines.append(f"| {t['target']} | {t['goal']} | {_f(t['measured'], 3)} | {mark} | {t['detail']} |")
        lines.append("")

    eng = r["throughput"]["engine"]
    if eng:
        conc = sorted({p["concurrency"] for pts in eng.values() for p in pts})
        lines += [
            f"## Real engine: throughput and latency (streamed, {plan['max_tokens']} output tokens per request)",
            "",
            (("Each point: a closed loop of `concurrency` streaming clients; {win:g} s measured after {ramp:g} s of "
              "load" + (" and once every running request streams (at most {rmax:g} s)" if plan.get("window_ramp_max") else "") +
              ", then the requests still running are cancelled. *out tok/s* counts every token streamed in the "
              "window; *done* the requests that started and finished inside it (latency and TTFT come from those; "
              "at high concurrency few or none fit). " if plan.get("window") else
              "Each point: max({min}, {w} x concurrency) requests. ") +
             "Measured {r} time(s) per system, the systems taking turns (interleaved), rounds pooled. Times in ms. "
             "CPU in % of one core: *front* is the process clients talk to, *system* every process of the system "
             "(engine included), *other* everything else on the machine during the point (other users of this "
             "machine: noise in every number). Output tok/s of each round in brackets.")
            .format(min=plan["min_requests"], w=plan["waves"], r=plan.get("rounds", 1), win=plan.get("window") or 0,
                    ramp=plan.get("window_ramp") or 0, rmax=plan.get("window_ramp_max") or 0),
            "",
            "| conc. | system | done | req/s | out tok/s | latency p50 | p99 | TTFT p50 | p99 | front CPU % | "
            "system CPU % | other CPU % | front RSS MB | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in conc:
            for name in ORDER:
                p = _point(eng.get(name), c)
                if not p:
                    continue
                res = p.get("resources") or {}
                rounds = p.get("rounds") or []
                per = f" ({', '.join(_f(x['output_tok_per_s'], 1) for x in rounds)})" if len(rounds) > 1 else ""
                lines.append(
                    f"| {c} | {LABELS[name]} | {p.get('ok', p['requests'])} | {_f(p['req_per_s'], 2)} | {_f(p['output_tok_per_s'], 1)}{per} | "
                    f"{_q(p.get('latency_ms'), 'p50', 0)} | {_q(p.get('latency_ms'), 'p99', 0)} | "
                    f"{_q(p.get('ttft_ms'), 'p50', 0)} | {_q(p.get('ttft_ms'), 'p99', 0)} | {_q(res, 'front_cpu_pct')} | "
                    f"{_q(res, 'system_cpu_pct')} | {_q(res, 'other_cpu_pct')} | {_q(res, 'front_peak_rss_mb', 0)} | {p['errors']} |"
                )
        if meta.get("points_kept_from_previous"):
            kept = sorted({c for cs in meta["points_kept_from_previous"].values() for c in cs})
            lines += ["", f"Concurrency {', '.join(map(str, kept))}: kept from the previous run (`--update`), measured "
                          "with that run's settings (see `meta.previous_runs` in results.json)."]
        lines += ["", "Ratios of output tokens/s (every request is max_tokens long: the same ratios as requests/s):", "",
                  "| conc. | fleet / vllm serve | fleet / LiteLLM | LiteLLM / vllm serve | vllm serve / offline | fleet / offline |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in conc:
            v = {n: (_point(eng.get(n), c) or {}).get("output_tok_per_s") for n in ("fleet", "vllm", "litellm", "offline")}
            lines.append(f"| {c} | {_ratio(v['fleet'], v['vllm'])} | {_ratio(v['fleet'], v['litellm'])} | "
                         f"{_ratio(v['litellm'], v['vllm'])} | {_ratio(v['vllm'], v['offline'])} | {_ratio(v['fleet'], v['offline'])} |")
        lines.append("")

    over = r["overhead"]
    if over["fixed_rate"]:
        lines += [
            f"## Gateway overhead with an instant upstream ({plan['instant_max_tokens']} tokens, "
            f"{'streamed' if plan['overhead_stream'] else 'not streamed'})",
            "",
            "Open loop at fixed rates (request i sent at i / rate). Latency in ms, from sending to the last byte. "
            "*direct* is the same load sent straight to the upstream (null engine / stub); *added* = gateway - direct, "
            "per percentile.",
            "",
            "| system | rate | requests | errors | p50 | p99 | direct p50 | direct p99 | added p50 | added p99 | "
            "gateway CPU % | gateway RSS MB | loadgen CPU % | other CPU % |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in ORDER:
            for row in over["fixed_rate"].get(name) or []:
                if "gateway" not in row:
                    lines.append(f"| {LABELS[name]} | {row['rate']:.0f} | not run: {row.get('skipped', '')} |" + " |" * 11)
                    continue
                g, d = row["gateway"], row["direct"]
                res = g.get("resources") or {}
                lines.append(
                    f"| {LABELS[name]} | {row['rate']:.0f} | {g['requests']} | {g['errors']} | "
                    f"{_q(g.get('latency_ms'), 'p50', 2)} | {_q(g.get('latency_ms'), 'p99', 2)} | "
                    f"{_q(d.get('latency_ms'), 'p50', 2)} | {_q(d.get('latency_ms'), 'p99', 2)} | "
                    f"{_f(row['added_p50_ms'], 2)} | {_f(row['added_p99_ms'], 2)} | {_q(res, 'front_cpu_pct')} | "
                    f"{_q(res, 'front_peak_rss_mb', 0)} | {_q(res, 'loadgen_cpu_pct')} | {_q(res, 'other_cpu_pct')} |"
                )
        lines.append("")
    if over["sustained"]:
        lines += [
            f"Highest sustained rate, open loop (every request answered, p99 counted from the scheduled send <= "
            f"{plan['slo_ms']:.0f} ms; steps of {plan['ramp_duration']} s, then bisection):",
            "",
            "| system | max sustained req/s | first rate not sustained | note |",
            "| --- | --- | --- | --- |",
        ]
        for name, s in over["sustained"].items():
            note = "ramp ended without a failure" if s.get("capped_by_ramp") else ""
            if "direct" in name:
                note = (note + "; " if note else "") + "the upstream alone: the harness's own ceiling for that path"
            lines.append(f"| {LABELS.get(name, name)} | {_f(s['max_rate'], 0)} | {_f(s.get('first_failed_rate'), 0)} | {note} |")
        lines.append("")
    inst = r["throughput"]["instant"]
    if inst:
        conc = sorted({p["concurrency"] for pts in inst.values() for p in pts})
        lines += [
            f"Gateway-only throughput (closed loop, streamed, {plan['instant_max_tokens']} tokens, instant upstream):",
            "",
            "| conc. | system | requests | req/s | latency p50 | p99 | TTFT p50 | gateway CPU % | gateway RSS MB | other CPU % | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in conc:
            for name in ORDER:
                p = _point(inst.get(name), c)
                if p:
                    res = p.get("resources") or {}
                    lines.append(
                        f"| {c} | {LABELS[name]} | {p['requests']} | {_f(p['req_per_s'], 1)} | "
                        f"{_q(p.get('latency_ms'), 'p50', 2)} | {_q(p.get('latency_ms'), 'p99', 2)} | "
                        f"{_q(p.get('ttft_ms'), 'p50', 2)} | {_q(res, 'front_cpu_pct')} | {_q(res, 'front_peak_rss_mb', 0)} | "
                        f"{_q(res, 'other_cpu_pct')} | {p['errors']} |")
        lines.append("")
    if r["systems"]:
        lines += ["## Start", "", "| system | front end answers (s) | model ready (s) |", "| --- | --- | --- |"]
        for name, s in r["systems"].items():
            lines.append(f"| {LABELS.get(name, name)} | {_f(s.get('start_s'), 2)} | {_f(s.get('ready_s'), 2)} |")
        lines.append("")
    if r.get("failures"):
        lines += ["## Failures", ""]
        for name, f in r["failures"].items():
            lines.append(f"- {name}: {f.splitlines()[0] if f else ''}")
        lines.append("")
    return "\n".join(lines)


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png, latency_cdf.png, ttft_cdf.png, overhead_cdf.png (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    eng = r["throughput"]["engine"]
    if eng:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        windowed = bool(r["meta"]["plan"].get("window"))
        max_tokens = r["meta"]["plan"]["max_tokens"]
        for name in ORDER:
            pts = sorted(eng.get(name) or [], key=lambda p: p["concurrency"])
            if not pts:
                continue
            style = "--" if name == "offline" else "-"
            xs = [p["concurrency"] for p in pts]
            if windowed:  # few requests finish inside a window: show tokens/s / tokens per request
                axes[0].plot(xs, [p["output_tok_per_s"] / max_tokens for p in pts], style, marker="o", label=LABELS[name])
            else:
                axes[0].plot(xs, [p["req_per_s"] for p in pts], style, marker="o", label=LABELS[name])
            axes[1].plot(xs, [p["output_tok_per_s"] for p in pts], style, marker="o", label=LABELS[name])
        for ax, title in zip(axes, ("requests/s" + (" (= output tok/s / max_tokens)" if windowed else ""), "output tokens/s"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (closed loop)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Throughput vs concurrency (real engine, streamed)")
        fig.tight_layout()
        written.append(_save(fig, out / "throughput.png"))
        for key, fname, title in (("latency_cdf_ms", "latency_cdf.png", "request latency"),
                                  ("ttft_cdf_ms", "ttft_cdf.png", "time to first token")):
            conc = sorted({p["concurrency"] for pts in eng.values() for p in pts if p.get(key)})
            if not conc:
                continue
            fig, axes = plt.subplots(1, len(conc), figsize=(3.6 * len(conc), 3.6), squeeze=False)
            for ax, c in zip(axes[0], conc, strict=True):
                for name in ORDER:
                    p = _point(eng.get(name), c)
                    if p and p.get(key):
                        ax.plot([v / 1e3 for v in p[key]], [q / 100 for q in CDF_POINTS], label=LABELS[name])
                ax.set_title(f"concurrency {c}")
                ax.set_xlabel("seconds")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("fraction of requests")
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"CDF of {title} (real engine, streamed)")
            fig.tight_layout()
            written.append(_save(fig, out / fname))
    over = r["overhead"]["fixed_rate"]
    if over:
        rates = sorted({row["rate"] for rows in over.values() for row in rows})
        fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 3.8), squeeze=False)
        for ax, rate in zip(axes[0], rates, strict=True):
            for name in ORDER:
                row = next((x for x in over.get(name) or [] if x["rate"] == rate and "gateway" in x), None)
                if not row:
                    continue
                for which, style in (("gateway", "-"), ("direct", ":")):
                    cdf = row[which].get("latency_cdf_ms")
                    if cdf:
                        label = LABELS[name] if which == "gateway" else f"{'null engine' if name == 'fleet-null' else 'stub'} direct"
                        ax.plot(cdf, [q / 100 for q in CDF_POINTS], style, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, log)")
            ax.set_title(f"{rate:.0f} req/s (open loop)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of requests")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Gateway latency with an instant upstream")
        fig.tight_layout()
        written.append(_save(fig, out / "overhead_cdf.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "benchmarks" / "results.json")
    data = json.loads(src.read_text())
    (src.parent / "results.md").write_text(markdown(data))
    print("\n".join(str(p) for p in plots(data, src.parent)))
