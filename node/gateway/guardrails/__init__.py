"""Guardrails: profiles of checks on what a caller sends and what it is answered.

`stage.py` is the pipeline's stage (which profile applies, input checks, output checks on a
complete answer, audit events and metrics); `stream.py` the hold-back window on a streamed
answer; one module per kind of check (`pii.py`: Presidio; `secrets.py`: detect-secrets;
`words.py`: banned words; `injection.py`: prompt injection scores), each behind the
`Detector` interface of `checks.py`; the remote ones, asked after those: `webhook.py` (an
external guardrail service) and `moderator.py` (a `/v1/moderations`-compatible deployment);
`texts.py` where a request's and answer's texts are.
Nothing here is imported unless the config has a profile.
"""
