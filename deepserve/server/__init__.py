"""The OpenAI-compatible HTTP server (`deepserve serve`): FastAPI app, protocol models,
reasoning parser, metrics, errors and YAML deployment files."""
