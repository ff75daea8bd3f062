"""Task data: how an input and a target are joined into text (format.py, shared by training, `lamp
eval` and clients) and the seeded synthetic tasks the bundled adapters were trained on (synthetic.py)."""
