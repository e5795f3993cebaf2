"""/v1/chat/completions: its schemas (`protocol`) and its planning and answers (`serving`)."""
