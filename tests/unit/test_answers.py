"""The one mapping of typed errors to HTTP (`stcs.answers`), and that both edges use it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import chromadb.errors

from stcs import errors
from stcs.answers import HTTP, answer_for, status_of
from stcs.errors import (
    CapacityTimeoutError,
    LookupsSaturatedError,
    RequestError,
    StartBackoffError,
    UserRateLimitError,
)


def _request_errors() -> list[type[RequestError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, RequestError) and cls is not RequestError
    ]


def test_every_request_error_has_its_own_row() -> None:
    missing = [cls.__name__ for cls in _request_errors() if cls not in HTTP]
    assert missing == []


def test_every_name_is_one_the_python_client_maps_to_an_exception() -> None:
    """The body's ``error`` must be a key of ``chromadb.errors.error_types``, or the unmodified
    client raises a generic exception instead of the matching one."""
    names = {name for _, name in HTTP.values()}
    assert names <= set(chromadb.errors.error_types), names - set(chromadb.errors.error_types)


def test_domain_errors_know_nothing_of_http() -> None:
    for cls in _request_errors():
        assert not hasattr(cls, "status") and not hasattr(cls, "headers"), cls.__name__


def test_retry_after_becomes_a_header_in_whole_seconds_at_least_one() -> None:
    answer = answer_for(CapacityTimeoutError("all slots busy", retry_after_s=5))
    assert (answer.status, answer.name) == (503, "RateLimitError")
    assert answer.headers == (("Retry-After", "5"),)
    assert answer_for(StartBackoffError("backing off", retry_after_s=0)).headers == (
        ("Retry-After", "1"),
    )
    limited = answer_for(UserRateLimitError("rate", "too many requests", 3))
    assert (limited.status, limited.headers) == (429, (("Retry-After", "3"),))
    assert json.loads(limited.body) == {"error": "RateLimitError", "message": "too many requests"}


def test_a_subclass_answers_as_its_base_and_an_unknown_error_as_500() -> None:
    assert status_of(LookupsSaturatedError("busy")) == 503

    class Unlisted(RequestError):
        pass

    answer = answer_for(Unlisted("something"))
    assert (answer.status, answer.name, answer.headers) == (500, "InternalError", ())


def test_no_module_but_the_edges_builds_an_error_response() -> None:
    """Statuses and ``Retry-After`` are decided in `stcs.answers` only: the supervisor, the
    launcher, quotas and auth raise domain errors."""
    root = Path(errors.__file__).parent
    inside = ("supervisor", "launcher", "auth", "upstream", "chroma_api", "errors")
    files = [root / f"{m}.py" for m in inside] + sorted((root / "quotas").glob("*.py"))
    offenders = [f.name for f in files if '"Retry-After"' in f.read_text()]
    assert offenders == []


def test_the_readme_error_table_has_a_row_for_every_answer() -> None:
    """Each (status, exception the Python client raises) that `stcs.answers` can produce is in
    the README's table, and the table claims nothing the mapping cannot produce."""
    readme = (Path(errors.__file__).parent.parent / "README.md").read_text()
    table = readme.split("| case | HTTP | client raises |", 1)[1].split("\n\n", 1)[0]
    documented = set()
    for row in table.strip().splitlines()[1:]:  # past the |---| line
        _, status, raises = row.rsplit("|", 3)[:3]
        documented.add((int(status.split()[0]), raises.split("`")[1]))
    produced = {
        (status, chromadb.errors.error_types[name].__name__) for status, name in HTTP.values()
    }
    assert produced == documented
