"""fleet: one OpenAI-compatible endpoint for a fleet of vLLM models, described in one fleet.toml.

The package, by role (each subpackage's docstring says what it owns and what it may import):

    cli.py      the `fleet` command
    terminal.py what the command prints as tables (fit to the terminal, plain rows for a pipe)
    run/        processes and their owner: launcher, supervisor, lifecycle, process trees
    gateway/    the HTTP server: Litestar app, bodies, keys, admission, tracking, metrics, control,
                and the status page at /ui (gateway/ui/)
    api/        OpenAI's API without HTTP: schemas, sampling rules, planning, answers per endpoint
    wire/       the internal protocol to the engines, its client and HTTP/1.1 transport
    config/     fleet.toml: schema, file rules, placement checks, model sources
    errors.py   every error type fleet reports
    engine/     the engine process (vLLM); started as `python -m fleet.engine`, imported by no other part
    cluster/    engines on a Ray cluster ([cluster]): imported by cli alone, and only then; imports ray

Imports point one way: cli -> run -> gateway -> api -> wire -> config -> errors. The engine
imports only wire, config, errors and run.process; nothing imports the engine.
"""

__version__ = "0.1.0"
