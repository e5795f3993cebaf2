"""/tokenize and /detokenize (vLLM's routes): their schemas (`protocol`) and answers (`serving`)."""
