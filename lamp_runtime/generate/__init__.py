"""`lamp generate` (cli.py): one completion from the command line.

A package of its own, above the engines it builds: the runtime's root package holds only the
leaves every layer imports (errors.py, requests.py), so no root module may import upwards.
"""
