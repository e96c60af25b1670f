"""Rare identifier tokens for DreamBooth: single tokens of the model's tokenizer that carry little meaning.

The rule (a token is proposed when all hold):
1. Whole word: a vocabulary entry that ends a word (CLIP's BPE marks those with '</w>') and is
   3 or 4 letters a-z. Short, so it is easy to type; a whole word, so it does not glue onto the next.
2. Single token: typed in a prompt, it comes back as exactly that one token id.
3. Not a word: it has no vowel (a, e, i, o, u, y) - nearly every English word and name has one - and
   it is not on a short list of well-known vowel-less abbreviations and interjections (STOP below,
   which includes 'sks', the usual choice, which is also a rifle's name).
4. Rarer first: CLIP's vocabulary numbers merges in the order BPE learned them, most frequent pair
   first, so a higher id is a rarer string. Candidates are listed from the highest id down.

The rule cannot know every abbreviation: sample "a photo of TOKEN" with the base model before
using a token. The embedded tiny model's vocabulary holds only the English words it was built
from, so nothing in it passes the rule: the helper says so rather than propose a word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfx.errors import BadInput

VOWELS = set("aeiouy")
WORD_END = "</w>"
_LETTERS = re.compile(r"^[a-z]{3,4}$")
# Vowel-less strings that do mean something (abbreviations, units, interjections, brands).
STOP = set("""
sks hmm hmmm brr brrr psst pfft shh shhh tsk tsks nth cwm mph kph rpm bpm pdf www html http nsfw
bbc cnn nfl nba mlb nhl bmw dvd usb gps lcd nyc sfw jpg png gif svg xxl xxx dnd rpg fps mmo pvp
cpu gpu rgb hdr dslr tbt lmk smh tfw thx pls plz btw dms nft mtg cctv vhs npc
""".split())


@dataclass(frozen=True)
class Candidate:
    token: str
    token_id: int

    def as_dict(self) -> dict:
        return {"token": self.token, "id": self.token_id}


def is_candidate(word: str) -> bool:
    """Rule 1 and 3 on the typed form of a token."""
    return bool(_LETTERS.match(word)) and not (set(word) & VOWELS) and word not in STOP


def suggest_tokens(tokenizer, count: int = 10) -> list[Candidate]:
    """Up to `count` tokens that pass the rule, rarest first."""
    if count < 1:
        raise BadInput(f"invalid --count {count}: must be at least 1")
    found = []
    for entry, token_id in tokenizer.get_vocab().items():
        if not entry.endswith(WORD_END):
            continue
        word = entry[: -len(WORD_END)]
        if not is_candidate(word):
            continue
        if tokenizer(word, add_special_tokens=False).input_ids != [token_id]:
            continue
        found.append(Candidate(word, int(token_id)))
    found.sort(key=lambda c: -c.token_id)
    return found[:count]


def load_tokenizer(settings):
    """The tokenizer of the model `settings` names, read alone when the model is a folder."""
    from vfx.models import pipeline_folder

    folder = pipeline_folder(settings.model)
    if folder is not None and (folder / "tokenizer").is_dir():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    return settings.pipeline().tokenizer
