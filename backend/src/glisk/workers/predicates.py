"""The rows each leased stage may claim: the predicates of the partial claim indexes.

A leaf module (no imports from glisk) because two places must agree on these strings to the
letter: the ``Token`` table arguments that declare the indexes, and the claim statements in
``glisk.workers.queries``, which repeat them so the planner can prove the partial index applies.

A stage claims a fresh token in its input status, or one in its working status that a leased
worker held (``claimed_by`` is kept after a claim ends; a token the transactional path moved there
is not ours). Whether the token is free right now (no live lease, no pending backoff) is not part
of the predicate: it changes on every claim, and the index would churn with it.
"""

CLAIM_INDEX_PREDICATES: dict[str, str] = {
    "image": (
        "image_path IS NULL AND (status = 'detected'"
        " OR (status = 'generating' AND claimed_by IS NOT NULL))"
    ),
    "upload": (
        "image_path IS NOT NULL AND (status = 'generating'"
        " OR (status = 'uploading' AND claimed_by IS NOT NULL))"
    ),
    "reveal": "status = 'ready'",
}
