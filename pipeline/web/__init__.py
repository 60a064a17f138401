"""`finsent serve`: a small server-rendered web app over the finsent store (see app.py, security.py)."""
