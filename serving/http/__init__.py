"""The HTTP surface of the ingress: routes only (routes.py), request-body limits and the one
error shape (middleware.py), multipart uploads (uploads.py), the admin token (auth.py), the
request / response schemas that convert themselves to engine objects (protocol.py) and the
mapping of every error to a status (errors.py)."""
