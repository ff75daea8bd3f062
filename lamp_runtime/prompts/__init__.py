"""A task's soft prompt once built: the math that builds it from an adapter's tensors (`math`),
the prepared prompt and how it is joined to a request's input embeddings (`prepared`), and the
byte-bounded device cache of prepared prompts (`cache`).

`math` is pure tensor arithmetic (a leaf every layer may use, the adapter kinds included);
`prepared` and `cache` sit above the adapter kinds and below the engines.
"""
