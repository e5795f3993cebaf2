"""The engine process: one vLLM AsyncLLM serving fleet's internal protocol.

`server` is the process (HTTP app, start, stop), `service` turns protocol requests into vLLM
calls and outputs into frames, `chat` renders a conversation through the model's chat template,
`encoding` turns prompt text into token ids, `args` builds vLLM's
engine arguments, `beam` runs classic beam search step-wise. Started as
``python -m fleet.engine``; nothing else imports this package.

May import: fleet.wire, fleet.config, fleet.machine, fleet.sources, fleet.errors, fleet.run.process;
torch and vllm.
"""
