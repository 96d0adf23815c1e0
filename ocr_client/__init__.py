"""A command-line client for the DeepSeek-OCR service: files in, markdown / ZIP / searchable PDF out.

It speaks only the public HTTP jobs API (`POST /jobs`, `GET /jobs/{id}/events|result|download`), so it works
against any deployment of the service, local or remote, and never imports the server's code. Each input is one
job; a small state file per input lets a second run follow the same job after Ctrl-C or a lost connection.
Run it as `python -m ocr_client` or `deepseek-ocr` (the console script).
"""

__version__ = "1.0.0"
