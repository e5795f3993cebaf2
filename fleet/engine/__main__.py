"""`python -m fleet.engine --model-json '<ModelConfig JSON>'`: the engine process."""

from fleet.engine.server import main

main()
