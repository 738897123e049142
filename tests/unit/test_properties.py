"""Property-based tests: no token or user id makes a path outside dbPath, and nothing raises
but the typed errors."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from stcs.auth import USER_ID_RE, UuidResolver, extract_token, validate_user_id
from stcs.errors import AuthError, InvalidUserIdError

DB = Path("/srv/stcs-db")

header_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200
) | st.sampled_from(["Bearer", "Bearer ", "bearer x", "Basic x", "Bearer a b", ""])
path_like = st.text(alphabet=string.printable + "é/\\.\x00", max_size=140)


def inside_db(user_id: str) -> bool:
    target = (DB / user_id).resolve()
    return target.parent == DB and target.name == user_id


@settings(max_examples=500, deadline=None)
@given(
    x_token=st.none() | header_text,
    authorization=st.none() | header_text,
)
def test_extract_token_returns_a_clean_token_or_raises_auth_error(
    x_token: str | None, authorization: str | None
) -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    if x_token is not None:
        headers["X-Chroma-Token"] = x_token
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        token = extract_token(headers)
    except AuthError:
        return
    assert token and token == token.strip()
    assert all(0x21 <= ord(c) <= 0x7E for c in token)


@settings(max_examples=1000, deadline=None)
@given(user_id=path_like | st.from_regex(USER_ID_RE, fullmatch=True))
@example("..")
@example("../x")
@example("a/../../b")
@example("x" * 129)
@example("a\n")
def test_a_valid_user_id_is_always_one_directory_inside_db_path(user_id: str) -> None:
    try:
        checked = validate_user_id(user_id)
    except InvalidUserIdError:
        return
    assert inside_db(checked)
    assert not checked.startswith(".")


@settings(max_examples=500, deadline=None)
@given(token=path_like | st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()))
def test_uuid_mode_only_yields_safe_lowercase_user_ids(token: str) -> None:
    try:
        user_id = asyncio.run(UuidResolver().resolve(token))
    except AuthError:
        return
    assert user_id == token.lower()
    assert validate_user_id(user_id) == user_id and inside_db(user_id)
