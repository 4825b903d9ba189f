"""Training data (arXiv 2412.19048, sec. 3.2). Owner: helper "data"; replace this stub, keep `text_hash` as is."""
import hashlib


def text_hash(text: str) -> str:
    """Stable identity of a text: aligns teacher-cache rows with training rows (row id + this hash)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
