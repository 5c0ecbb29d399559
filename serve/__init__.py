"""An OpenAI-compatible server (with a web chat page) for ChatGLM2 model folders: `python -m serve`."""
