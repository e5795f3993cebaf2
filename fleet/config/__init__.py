"""fleet.toml: the whole file and its fleet-wide tables (`schema`), a model's table and its
replicas (`model`), the field types they share (`fields`), how a file is read and the rules it must
satisfy (`load`), the checks that need the machine (`placement`), and where model weights come from
(`sources`).

May import: fleet.errors only. Imported by every other part.
"""
