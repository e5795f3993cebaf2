"""fleet.toml, the file: the whole file and its fleet-wide tables (`schema`), a model's table and
its replicas (`model`), the field types they share (`fields`), how a file is read and the rules it
must satisfy (`load`), and the file as `fleet check` shows it (`show`). Nothing here looks at the
machine (fleet.machine) or at model weights (fleet.sources).

May import: fleet.errors. Imported by every other part.
"""
