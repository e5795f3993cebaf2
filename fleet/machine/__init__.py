"""This machine, as fleet needs to know it before anything starts: what it has (`probe`: GPUs,
ports in use, processor features, the Hugging Face cache; the dtype and cores an engine gets) and
the checks a fleet file must pass on it (`check`).

May import: fleet.config, fleet.sources, fleet.errors.
"""
