"""The HTTP toolkit the router (serving/ingress.py) builds on: request-body limits and the one error
shape (middleware.py, errors.py), multipart uploads (uploads.py), the admin token (auth.py), cursor
pages (paging.py), the request / response schemas that convert themselves to engine objects
(protocol.py, chat.py, logprobs.py) and the status page (status_page.html).

Nothing here imports the serving modules above it (the router, the ingress logic, the replica):
serving/ imports serving/http/, never the other way round (tests/test_package_cycles.py)."""
