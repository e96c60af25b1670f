"""A small byte-level BPE vocabulary in CLIP's file format, built locally for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

# Words that get whole-word tokens; everything else falls back to byte-level pieces.
WORDS = (
    "a an the of in on at with and photo picture painting drawing style video frame of by "
    "dog cat woman man person running walking car tree sky sea beach snow forest city street "
    "red blue green white black yellow golden silver robot statue marble wood metal glass "
    "van gogh pixar anime cartoon watercolor oil sketch fire water ice night day sunset "
    "ugly blurry low res unrealistic unaesthetic high quality detailed"
).split()

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map of the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def build_vocab() -> tuple[dict[str, int], list[str]]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen_merges = set()
    for word in dict.fromkeys(WORDS):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
                tokens.append(current)
    tokens = list(dict.fromkeys(tokens)) + list(SPECIALS)
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write vocab.json and merges.txt; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)
