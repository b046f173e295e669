"""``lorakit serve``: an OpenAI-compatible HTTP server over one base model and a folder of adapters.

Pieces, each in its own module: ``paths`` (adapter names resolve only inside the adapters folder), ``pool``
(which adapters are loaded: LRU, pins, admission checks), ``engine`` (continuous batching over mixed-adapter
batches), ``text`` (incremental detokenization, stop strings, a token's bytes), ``protocol`` (request bodies and
the OpenAI error body), ``transport`` (reading bodies, error answers, CORS), ``answers`` (logprobs objects and
server-sent events), ``app`` (the FastAPI endpoints) and ``cli`` (the command). FastAPI and uvicorn load only here.
"""
