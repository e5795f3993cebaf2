"""/v1/embeddings: its schemas (`protocol`) and its planning and answer (`serving`)."""
