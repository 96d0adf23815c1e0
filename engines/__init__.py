"""Engines behind one protocol (`engines.base.Engine`): our PyTorch model and vLLM, chosen by name in
`engines.registry`. Where they run (in this process, worker processes, Ray actors) is `workers/`."""
