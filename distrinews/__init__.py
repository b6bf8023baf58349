"""What every layer of the project shares, and nothing else: the error types and exit statuses (errors.py).

It imports nothing of the project, so that the server (server/) and its images need nothing of
training (experiments/) to report an error the way every other entry point does.
"""
