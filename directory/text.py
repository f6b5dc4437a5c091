"""Text rules shared by every path that stores or matches names.

Profile values come from strangers (remote servers, event content), so they are
cleaned the same way wherever they enter: strings only, control characters removed,
length capped. Search words are derived here too, so that indexing and querying split
text identically on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import unicodedata

# Synapse caps display names at 256 characters; avatar URLs are short mxc:// URIs.
MAX_DISPLAYNAME_LENGTH = 256
MAX_AVATAR_URL_LENGTH = 1024
# A search term longer than this cannot match anything a display name may hold.
MAX_SEARCH_TERM_LENGTH = 512

_WORD = re.compile(r"[^\W_]+")
# Exactly the Unicode categories Cc (C0, DEL, C1) and Cs (surrogates): one regex pass
# instead of a category lookup per character, on the hot path of every member event.
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_WHITESPACE = re.compile(r"\s")


def clean_text(value: object, max_length: int) -> str | None:
    """A printable, trimmed, capped string, or None for anything else or empty."""
    if not isinstance(value, str):
        return None
    cleaned = _CONTROL_OR_SURROGATE.sub("", value).strip()[:max_length].strip()
    return cleaned or None


def has_control_characters(value: str) -> bool:
    """Control characters or lone surrogates: never part of an identifier, and a NUL or
    a surrogate cannot even be stored (PostgreSQL text, UTF-8)."""
    return _CONTROL_OR_SURROGATE.search(value) is not None


def clean_displayname(value: object) -> str | None:
    return clean_text(value, MAX_DISPLAYNAME_LENGTH)


def clean_avatar_url(value: object) -> str | None:
    url = clean_text(value, MAX_AVATAR_URL_LENGTH)
    if url is None or not url.startswith("mxc://") or _WHITESPACE.search(url):
        return None
    return url


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str | None) -> list[str]:
    """Lower-cased alphanumeric runs: 'Alice.Smith-Jones' -> ['alice', 'smith', 'jones']."""
    if not text:
        return []
    return _WORD.findall(normalise(text))


def split_user_id(user_id: str) -> tuple[str, str]:
    """'@alice:example.org' -> ('alice', 'example.org')."""
    localpart, _, server = user_id.partition(":")
    return localpart.removeprefix("@"), server


def search_words(user_id: str, display_name: str | None) -> str:
    """What the search index holds for one entry: user id words, then name words."""
    return " ".join(dict.fromkeys(words(user_id) + words(display_name)))


def entry_keys(user_id: str, display_name: str | None) -> dict[str, str | None]:
    """The derived user_directory columns for an entry with this public name."""
    return {
        "search_words": search_words(user_id, display_name),
        "localpart_key": normalise(split_user_id(user_id)[0]),
        "name_key": normalise(display_name) if display_name else None,
    }
