"""`python -m fleet.engine --model-json '<ModelConfig JSON>'`: the engine process."""

from fleet.run.process import keep_to_bound_cores

keep_to_bound_cores()  # before the server's imports load torch (process.py says why)

from fleet.engine.server import main  # noqa: E402

main()
