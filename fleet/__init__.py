"""fleet: one OpenAI-compatible endpoint for a fleet of vLLM models, described in one fleet.toml.

The package, by role (each module's or subpackage's docstring says what it owns and what it may
import; tests/test_architecture.py holds the code to it):

    cli.py        the `fleet` command
    remote.py     a running fleet, reached through its gateway's control routes (for the commands)
    terminal.py   what the command prints as tables (fit to the terminal, plain rows for a pipe)
    cluster/      engines on a Ray cluster ([cluster]): imported by cli alone, and only then; imports ray
    engine/       the engine process (vLLM); started as `python -m fleet.engine`, imported by no other part
    run/          processes and their owners: the launcher, the one owner loop over each engine's
                  runtime (a local process, an attached engine), process trees
    gateway/      the HTTP server: Litestar app, bodies, keys, admission, tracking, routing, metrics,
                  control, and the status page at /ui (gateway/ui/)
    api/          OpenAI's API without HTTP: one folder per endpoint, shared rules, planning, answers
    wire/         the internal protocol to the engines, its client and HTTP/1.1 transport
    machine/      this machine: what it has (GPUs, ports, CPU features) and the checks before a start
    config/       fleet.toml, the file: schema, loading, the rules between fields
    sources.py    model sources: what a `source` names, resolved (and converted) for vLLM
    lifecycle.py  an engine's states, their transitions, and the object that holds one
    errors.py     every error type fleet reports
    pulse.py      waking the tasks that wait on a value its owner changes

Imports point one way, down that list (docs/architecture.md draws it); nothing imports the engine.

May import: nothing of fleet (the package's face).
"""

__version__ = "0.1.0"
