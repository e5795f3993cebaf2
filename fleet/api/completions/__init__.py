"""/v1/completions: its schemas (`protocol`) and its planning and answers (`serving`)."""
