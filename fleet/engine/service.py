"""Protocol requests -> vLLM calls, and vLLM outputs -> protocol frames, for one engine."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from fleet.engine.chat import fewest_turns_left_out, render_chat
from fleet.engine.encoding import encoder
from fleet.engine.parsing import Parsers, Reader
from fleet.engine.refusals import ended_in_error, failure, structured_param
from fleet.engine.resume import Continued
from fleet.errors import InvalidRequest, listed
from fleet.wire import protocol
from fleet.wire.asgi import LastChunk

log = logging.getLogger("fleet.engine")
# A fault for tests of what a replica's death costs: an engine whose environment names a text dies
# (SIGKILL, itself) after the first output of any prompt containing it (a "poison prompt"): a
# stream's first token is sent, a whole answer's nothing.
DIE_ON_ENV = "FLEET_TEST_DIE_ON"


class EngineService:
    """Turns protocol requests into vLLM calls and vLLM outputs into protocol frames."""

    requests = 0  # /generate requests this engine took (GET /stats): which replica served what
    prompt_tokens = 0  # of the requests that finished, and of those the prefix cache had (GET /stats)
    cached_tokens = 0
    asleep_at = 0  # the sleep level it sleeps at (0: awake)
    die_on: str | None = None  # DIE_ON_ENV's text: a test's poison prompt

    def __init__(self, engine: Any, name: str, chat_template: str | None = None, *, tool_parser: str | None = None,
                 reasoning_parser: str | None = None, adapters: Mapping[str, str] | None = None) -> None:
        from vllm import __version__ as vllm_version

        self.engine = engine
        self.name = name
        self.loras: dict[str, Any] = {}  # adapter name -> its vLLM LoRARequest (ids from 1, in the file's order)
        self._lora_ids = 0
        for a, p in (adapters or {}).items():
            self.loras[a] = self._lora_request(a, p)
        self.tokenizer = engine.get_tokenizer()
        self.parsers = Parsers(self.tokenizer, tool_parser, reasoning_parser)  # reasoning and tool calls read apart
        self.encode = encoder(self.tokenizer)  # text -> ids on the request's path (encoding.py)
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None)
        self.die_on = os.environ.get(DIE_ON_ENV) or None
        model_config = engine.model_config
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size: int = model_config.get_vocab_size()
        self.info = protocol.EngineInfo(
            model=name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            vllm_version=vllm_version,
            device=str(engine.vllm_config.device_config.device_type),
            chat_template=self.chat_template is not None,
            task="embed" if model_config.runner_type == "pooling" else "generate",
        )

    @property
    def healthy(self) -> bool:
        """False once the vLLM engine died; the launcher then restarts this process."""
        return not self.engine.errored

    def _lora_request(self, name: str, path: str) -> Any:
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1  # vLLM's id of an adapter: never reused, so a re-loaded adapter is loaded afresh
        return LoRARequest(name, self._lora_ids, str(Path(path).expanduser()))

    async def load_adapter(self, name: str, path: str) -> None:
        """An adapter added at run time (fleet's /v1/load_lora_adapter), loaded into vLLM now: a path that
        is no adapter of this model fails here (ValueError), not on its first request."""
        if name in self.loras:
            raise ValueError(f"model {self.name!r} already has an adapter {name!r}")
        lora = self._lora_request(name, path)
        try:
            await self.engine.add_lora(lora)
        except Exception as e:  # vLLM's reasons (no such folder, another base, a rank above the limit)
            raise ValueError(f"adapter {name!r} at {path}: {e}") from None
        self.loras[name] = lora

    async def unload_adapter(self, name: str) -> None:
        """Forget an adapter; requests naming it get a 404 from now on."""
        lora = self.loras.pop(name, None)
        if lora is None:
            raise ValueError(f"model {self.name!r} has no adapter {name!r}")
        await self.engine.remove_lora(lora.lora_int_id)

    def lora(self, req: protocol.GenerateRequest) -> Any:
        """The vLLM LoRARequest of the request's adapter (None: the base model)."""
        return self.loras.get(req.adapter) if req.adapter is not None else None

    async def sleep(self, level: int) -> None:
        """vLLM's sleep mode: level 1 moves the weights to CPU memory and drops the KV cache, level 2
        drops both (the fleet drained the engine first: nothing runs)."""
        self.asleep_at = level
        await self.engine.sleep(level)

    async def wake_up(self) -> None:
        """Back from sleep. After level 2 the weights are gone: they are reloaded from the model's
        files between waking the weights' memory and the KV cache's (vLLM's documented order)."""
        if self.asleep_at == 2:
            await self.engine.wake_up(["weights"])
            await self.engine.collective_rpc("reload_weights")
            await self.engine.wake_up(["kv_cache"])
        else:
            await self.engine.wake_up()
        await self.engine.reset_prefix_cache()  # what was cached went with the KV cache
        self.asleep_at = 0

    def prompt_ids(self, req: protocol.GenerateRequest) -> list[int]:
        """The prompt as token ids, checked against the vocabulary and the context length."""
        ids: list[int]
        if isinstance(req.prompt, str):
            ids = self.encode(req.prompt, True)
        elif isinstance(req.prompt, protocol.Chat):
            need = 1 if req.sampling.clamp_max_tokens else req.sampling.max_tokens
            ids = self.chat_ids(req.prompt, max(need, req.sampling.min_tokens, 1))
        else:
            ids = req.prompt
            self.check_in_vocabulary(ids, "prompt")
        if not ids:  # vLLM's own refusal names no field
            raise InvalidRequest("the prompt is empty: it encodes to no tokens (this model's tokenizer adds none "
                                 "of its own)", param="prompt")
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens, which fills the model's context of "
                f"{self.max_model_len} tokens and leaves no room to generate",
                param="messages" if isinstance(req.prompt, protocol.Chat) else "prompt",
            )
        if req.sampling.max_tokens > room and not req.sampling.clamp_max_tokens:
            raise InvalidRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(ids)} tokens, so max_tokens can be at most {room}, got {req.sampling.max_tokens}",
                param="max_tokens",
            )
        if req.sampling.min_tokens > room:
            raise InvalidRequest(
                f"min_tokens ({req.sampling.min_tokens}) is more than the {room} tokens this model's context "
                f"({self.max_model_len}) leaves after the prompt's {len(ids)}",
                param="min_tokens",
            )
        return ids

    def chat_ids(self, chat: protocol.Chat, need: int) -> list[int]:
        """A conversation's prompt ids; with `truncate`, where they leave fewer than `need` tokens
        of the context, its oldest turns left out (chat.fewest_turns_left_out)."""
        def ids_of(kept: protocol.Chat) -> list[int]:
            return self.encode(self.render_chat(kept), False)

        ids = ids_of(chat)
        if not chat.truncate or len(ids) + need <= self.max_model_len:
            return ids
        return fewest_turns_left_out(chat, ids_of, lambda tried: len(tried) + need <= self.max_model_len) or ids

    def check_in_vocabulary(self, ids: Iterable[int], param: str) -> None:
        """Token ids this model has: else a 400 naming the field, a few of the ids and how many."""
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            which = f"token id {bad[0]} is" if len(bad) == 1 else f"{len(bad):,} token ids ({listed(bad)}) are"
            raise InvalidRequest(f"{which} out of the vocabulary (size {self.vocab_size})", param=param)

    def check_sampling_ids(self, s: protocol.SamplingParams) -> None:
        """Every field of the sampling parameters that carries token ids, checked before vLLM sees them."""
        if s.logit_bias:
            self.check_in_vocabulary(s.logit_bias, "logit_bias")
        self.check_in_vocabulary(s.stop_token_ids, "stop_token_ids")
        if s.allowed_token_ids is not None:
            self.check_in_vocabulary(s.allowed_token_ids, "allowed_token_ids")

    def render_chat(self, chat: protocol.Chat) -> str:
        """The conversation as prompt text, through the model's chat template."""
        return render_chat(self.tokenizer, self.chat_template, self.name, chat)

    def sampling_params(self, s: protocol.SamplingParams, room: int, final_only: bool = False,
                        skip_special_tokens: bool = True) -> Any:
        """vLLM SamplingParams for one request: streaming deltas, or each output once when it ends."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if (c := s.structured) is not None:
            structured = StructuredOutputsParams(json=c.json, json_object=c.json_object or None, regex=c.regex,
                                                 choice=c.choice, grammar=c.grammar)
        return SamplingParams(
            n=s.n,
            max_tokens=min(s.max_tokens, room),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0 if s.top_k == -1 else s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            stop=s.stop or None,
            stop_token_ids=s.stop_token_ids or None,
            allowed_token_ids=s.allowed_token_ids,
            bad_words=s.bad_words or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=s.logit_bias,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            # vLLM computes a cumulative logprob only with logprobs on: 0 asks for the sampled token's alone
            logprobs=s.logprobs if s.logprobs is not None else (0 if s.cumulative_logprob else None),
            prompt_logprobs=s.prompt_logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
            skip_special_tokens=skip_special_tokens,  # a tool parser may read special tokens (hermes' <tool_call>)
            skip_clone=True,  # made for this request alone: vLLM need not deep-copy it (its own server does the same)
        )

    def token_text(self, token_id: int, logprob: Any) -> str:
        """The text of one token as the logprobs report it."""
        text: str | None = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self.tokenizer.decode([token_id])
        return text

    def position(self, token_id: int, entries: dict[int, Any] | None) -> protocol.TokenLogprob:
        """One position's logprob and alternatives, best first (the chosen token included)."""
        if not entries:
            return protocol.TokenLogprob(self.tokenizer.decode([token_id]), None, None)
        chosen = entries.get(token_id)
        top = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)
        return protocol.TokenLogprob(
            self.token_text(token_id, chosen) if chosen else self.tokenizer.decode([token_id]),
            chosen.logprob if chosen else None,
            [(self.token_text(t, lp), lp.logprob) for t, lp in top],
        )

    async def frames(self, req: protocol.GenerateRequest) -> AsyncGenerator[bytes, None]:
        """The /generate response body: Prompt, Deltas, then Done or Error."""
        self.requests += 1
        try:
            ids = self.prompt_ids(req)
            self.check_sampling_ids(req.sampling)
        except InvalidRequest as e:
            yield protocol.encode_frame(protocol.Error(e.message, status=400, param=e.param))
            return
        if req.adapter is not None and req.adapter not in self.loras:
            yield protocol.encode_frame(protocol.Error(f"model {self.name!r} has no adapter {req.adapter!r}", status=404,
                                                       param="model"))
            return
        if req.beam is not None:
            from fleet.engine.beam import beam_search_frames

            async for chunk in beam_search_frames(self, req, ids):
                yield chunk
            return
        try:
            parsing = self.parsers.request(req)  # what vLLM's parsers read (None: none of them reads this answer)
        except Exception as e:  # tools a parser refuses
            yield protocol.encode_frame(self.failure(e, req.request_id, param="tools"))
            return
        readers: dict[int, Reader | None] = {}
        room, skip_special = self.max_model_len - len(ids), getattr(parsing, "skip_special_tokens", True)
        continued = None  # a continuation's text, made here as the first engine's would have gone on (resume.py)
        if req.resume is not None:
            cut = len(ids) - req.resume.generated
            original = self.sampling_params(req.sampling, room, skip_special_tokens=skip_special)
            original.min_tokens = req.sampling.min_tokens + req.resume.generated
            try:
                continued = Continued(self.tokenizer, original, ids[:cut], ids[cut:], req.resume.text_sent, req.request_id)
            except Exception as e:  # vLLM's detokenizer refused these ids
                yield protocol.encode_frame(self.failure(e, req.request_id))
                return
            params = self.sampling_params(msgspec.structs.replace(req.sampling, stop=[]), room, req.final_only, skip_special)
        else:
            params = self.sampling_params(req.sampling, room, req.final_only, skip_special)
        per_token = req.sampling.logprobs is not None  # not for best_of's ranking alone
        poisoned = self.die_on is not None and self.die_on in self.tokenizer.decode(ids)
        completion_tokens = cached = 0
        first = True
        last = b""  # the finishing step's frames: they go out with Done, as the answer's last chunk
        try:
            outputs = self.engine.generate({"prompt_token_ids": ids}, params, req.request_id, lora_request=self.lora(req))
            async with contextlib.aclosing(outputs):  # leaving early (a stop string matched here) aborts it in vLLM
                async for out in outputs:
                    if poisoned and (not first or out.finished):
                        log.error("request %s: its prompt names %s=%r: dying", req.request_id, DIE_ON_ENV, self.die_on)
                        os.kill(os.getpid(), signal.SIGKILL)
                    cached = out.num_cached_tokens or cached  # known from the first step on
                    frames = bytearray()
                    if first:
                        first = False
                        frames += protocol.encode_frame(self.prompt_frame(ids, out.prompt_logprobs, req.echo))
                    stopped = False
                    for c in out.outputs:
                        if c.finish_reason == "error":  # vLLM ended it on a failure of its own (its log says which)
                            yield protocol.encode_frame(ended_in_error(req.sampling, req.request_id))
                            return
                        completion_tokens += len(c.token_ids)
                        if c.index not in readers:
                            readers[c.index] = self.parsers.reader(req, parsing)
                        delta = self.delta(c, per_token, readers[c.index], req.final_only)
                        if continued is not None:  # one choice: a continuation has n = 1
                            delta.text, stopped = continued.feed(c.token_ids, c.finish_reason)
                            if stopped:
                                delta.finish_reason = "stop"
                        frames += protocol.encode_frame(delta)
                    if out.finished or stopped:  # vLLM's generate ends right after its finished output
                        last = bytes(frames)
                        if stopped:  # a continuation's stop string, found here: vLLM's request is aborted
                            break
                    elif frames:
                        yield bytes(frames)
        except Exception as e:  # reported to the gateway, never swallowed
            yield protocol.encode_frame(self.failure(e, req.request_id, structured_param(e, req.sampling.structured)))
            return
        self.prompt_tokens += len(ids)
        self.cached_tokens += cached
        reasoning_tokens = sum(r.reasoning_tokens for r in readers.values() if r is not None)
        yield LastChunk(last + protocol.encode_frame(protocol.Done(
            prompt_tokens=len(ids), completion_tokens=completion_tokens, cached_tokens=cached,
            reasoning_tokens=reasoning_tokens)))

    # --- tokens, and embeddings (a pooling engine) -------------------------------------------------

    async def tokenize(self, req: protocol.TokenizeRequest) -> AsyncGenerator[bytes, None]:
        """/tokenize: the prompt's token ids as /generate would take them (a chat through its template)."""
        try:
            if isinstance(req.prompt, protocol.Chat):
                ids = self.encode(self.render_chat(req.prompt), False)
            else:
                ids = self.encode(req.prompt, req.add_special_tokens)
        except InvalidRequest as e:
            yield protocol.encode_frame(protocol.Error(e.message, status=400, param=e.param))
            return
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.token_strs else None
        yield LastChunk(protocol.encode_frame(protocol.Tokens(ids, self.max_model_len, strs)) + protocol.encode_frame(
            protocol.Done(prompt_tokens=len(ids), completion_tokens=0)))

    async def detokenize(self, req: protocol.DetokenizeRequest) -> AsyncGenerator[bytes, None]:
        """/detokenize: the text of token ids."""
        try:
            self.check_in_vocabulary(req.ids, "tokens")
        except InvalidRequest as e:
            yield protocol.encode_frame(protocol.Error(e.message, status=400, param=e.param))
            return
        yield LastChunk(protocol.encode_frame(protocol.Text(self.tokenizer.decode(req.ids))) + protocol.encode_frame(
            protocol.Done(prompt_tokens=len(req.ids), completion_tokens=0)))

    async def embed(self, req: protocol.EmbedRequest) -> AsyncGenerator[bytes, None]:
        """/embed: each input's embedding (vLLM's pooling runner), then Done with the tokens read."""
        import asyncio

        from vllm import PoolingParams

        self.requests += 1
        try:
            prompts = []
            for i, item in enumerate(req.inputs):
                ids = self.encode(item, True) if isinstance(item, str) else item
                self.check_in_vocabulary(ids, "input")
                if len(ids) > self.max_model_len:
                    raise InvalidRequest(f"input {i} has {len(ids)} tokens, more than this model's context of "
                                         f"{self.max_model_len}", param="input")
                if not ids:
                    raise InvalidRequest(f"input {i} is empty", param="input")
                prompts.append(ids)
            params = PoolingParams(task="embed", dimensions=req.dimensions)
            try:
                params.verify(self.engine.model_config)
            except Exception as e:  # dimensions this model cannot give (vLLMValidationError: no Matryoshka embeddings)
                raise InvalidRequest(str(e), param="dimensions") from None
        except InvalidRequest as e:
            yield protocol.encode_frame(protocol.Error(e.message, status=400, param=e.param))
            return

        async def one(index: int, ids: list[int]) -> Any:
            last = None
            async for out in self.engine.encode({"prompt_token_ids": ids}, params.clone(), f"{req.request_id}-{index}"):
                last = out  # FINAL_ONLY: one output, when the input is read
            return last

        try:
            outputs = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
        except Exception as e:  # reported to the gateway, never swallowed
            yield protocol.encode_frame(self.failure(e, req.request_id, param="input"))
            return
        frames = bytearray()
        for i, (ids, out) in enumerate(zip(prompts, outputs, strict=True)):
            vector = out.outputs.data.float().cpu().numpy().astype("<f4").tobytes()
            frames += protocol.encode_frame(protocol.Embedding(i, vector, len(ids)))
        total = sum(len(ids) for ids in prompts)
        self.prompt_tokens += total
        frames += protocol.encode_frame(protocol.Done(prompt_tokens=total, completion_tokens=0))
        yield LastChunk(frames)

    failure = staticmethod(failure)  # the frame that ends a request vLLM failed (refusals.py)

    def delta(self, out: Any, per_token: bool, reader: Reader | None = None, whole: bool = False) -> protocol.Delta:
        """One choice's new output (vLLM's CompletionOutput) as a Delta frame. Per-token logprobs
        only when the client asked for them: best_of's ranking needs the cumulative logprob alone.
        With a `reader`, the text is read apart: content, reasoning, tool calls (parsing.py)."""
        logprobs = None
        if per_token and out.logprobs is not None:
            logprobs = [self.position(t, e) for t, e in zip(out.token_ids, out.logprobs, strict=False)]
        text, reasoning, calls = out.text, "", None
        if reader is not None:
            piece = reader.whole(out.text, out.token_ids) if whole else reader.step(out.text, out.token_ids)
            text, reasoning, calls = piece.content, piece.reasoning, piece.calls or None
        return protocol.Delta(
            index=out.index,
            text=text,
            token_ids=list(out.token_ids),
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            cumulative_logprob=out.cumulative_logprob,
            reasoning=reasoning,
            tool_calls=calls,
        )

    def prompt_frame(self, ids: list[int], prompt_logprobs: Any, echo: bool) -> protocol.Prompt:
        """The Prompt frame: token ids, text for echo, and per-token logprobs when asked."""
        logprobs = None
        if prompt_logprobs is not None:
            logprobs = [
                protocol.TokenLogprob(self.tokenizer.decode([t]), None, None) if e is None else self.position(t, e)
                for t, e in zip(ids, prompt_logprobs, strict=False)
            ]
        return protocol.Prompt(token_ids=ids, text=self.tokenizer.decode(ids) if echo else None, logprobs=logprobs)
