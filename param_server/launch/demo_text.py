"""The demo's institutions' own text, and a tokenizer built for the demo model.

Each institution writes a different kind of plain-language record (ward
notes, radiology reports, laboratory results), so their text shares little
beyond common words: clearly non-IID. Lines are generated from templates,
deterministically for a seed, and written as JSON Lines (`{"text": ...}`),
which is what an institution would point `data-path` at.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_NAMES = ("mrs smith", "mr jones", "ms brown", "mr patel", "mrs garcia", "mr chen")

# kind -> (what it is, sentence templates, slot fillers)
KINDS: dict[str, tuple[str, tuple[str, ...], Mapping[str, Sequence[str]]]] = {
    "ward": (
        "ward notes",
        (
            "{name} was admitted on {day} with {symptom} and {symptom}.",
            "the patient reported {symptom} since {day} ; we started {drug} "
            "twice a day.",
            "temperature was {temp} degrees and the pulse was {pulse} .",
            "{name} slept well , ate {meal} and walked {metres} metres with help.",
            "plan : continue {drug} , check bloods on {day} , discharge if "
            "{condition} .",
            "family visited on {day} ; {name} is in good spirits and asks about "
            "going home.",
        ),
        {
            "name": _NAMES,
            "day": _DAYS,
            "symptom": ("a fever", "a cough", "chest pain", "nausea", "a headache"),
            "drug": ("paracetamol", "amoxicillin", "ibuprofen", "insulin"),
            "temp": ("thirty seven", "thirty eight", "thirty nine"),
            "pulse": ("sixty", "seventy", "eighty", "ninety"),
            "meal": ("breakfast", "lunch", "half of dinner", "soup"),
            "metres": ("ten", "twenty", "fifty", "one hundred"),
            "condition": ("the fever settles", "she eats well", "he can walk"),
        },
    ),
    "radiology": (
        "radiology reports",
        (
            "chest x ray shows {finding} in the {side} {lobe} lobe.",
            "ct of the {organ} shows no {finding} ; the {organ} is normal in size.",
            "compared with the scan from {day} , the {finding} is {change} .",
            "impression : {impression} . recommend {followup} in {weeks} weeks.",
            "ultrasound of the {organ} is limited by {limit} ; no mass is seen.",
        ),
        {
            "finding": ("consolidation", "a small effusion", "a nodule", "scarring"),
            "side": ("left", "right"),
            "lobe": ("upper", "middle", "lower"),
            "organ": ("liver", "kidney", "spleen", "abdomen", "pelvis"),
            "day": _DAYS,
            "change": ("smaller", "unchanged", "slightly larger", "resolved"),
            "impression": ("likely infection", "no acute disease", "stable disease"),
            "followup": ("a repeat x ray", "a ct scan", "clinical review"),
            "weeks": ("two", "four", "six", "twelve"),
            "limit": ("bowel gas", "patient size", "movement"),
        },
    ),
    "lab": (
        "laboratory results",
        (
            "sample {code} received on {day} : haemoglobin {level} , white cells "
            "{level} .",
            "sodium {level} , potassium {level} , creatinine {level} ; repeat "
            "{marker} on {day} .",
            "the {culture} culture grew {organism} sensitive to {antibiotic} .",
            "{marker} is {level} compared with last week ; the analyser was "
            "calibrated on {day} .",
            "sample {code} was haemolysed ; please send a new {tube} tube.",
        ),
        {
            "code": ("a17", "b42", "c03", "d88", "e21"),
            "day": _DAYS,
            "level": ("low", "normal", "high", "borderline"),
            "marker": ("crp", "troponin", "glucose", "lactate"),
            "culture": ("blood", "urine", "sputum", "wound"),
            "organism": ("e coli", "staph aureus", "klebsiella", "strep"),
            "antibiotic": ("gentamicin", "ceftriaxone", "vancomycin", "amoxicillin"),
            "tube": ("purple", "yellow", "blue", "grey"),
        },
    ),
}


def _line(rng: random.Random, kind: str) -> str:
    _, templates, fillers = KINDS[kind]
    sentences = []
    for template in rng.sample(templates, rng.randint(2, 3)):
        sentences.append(
            re.sub(r"\{(\w+)\}", lambda m: rng.choice(fillers[m.group(1)]), template)
        )
    return " ".join(sentences)


def write_institution_text(
    dest: Path, institutions: Sequence[str], *, lines: int = 300, seed: int = 0
) -> dict[str, tuple[Path, str]]:
    """One JSON Lines file per institution under `dest`, each of its own kind
    (in the order of KINDS); returns institution -> (file, what it holds)."""
    dest.mkdir(parents=True, exist_ok=True)
    kinds = list(KINDS)
    out = {}
    for i, name in enumerate(institutions):
        kind = kinds[i % len(kinds)]
        rng = random.Random(f"{seed}/{name}")
        path = dest / f"{name}.jsonl"
        with path.open("w") as f:
            for _ in range(lines):
                f.write(json.dumps({"text": _line(rng, kind)}) + "\n")
        out[name] = (path, KINDS[kind][0])
    return out


SPECIALS = ("<pad>", "<unk>", "<eos>")


def write_word_tokenizer(files: Sequence[Path], dest: Path) -> int:
    """A word-level tokenizer over every word of `files` (JSON Lines with a
    `text` field), saved to `dest` as transformers saves one
    (tokenizer.json and its config). Returns its vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for path in files:
        for row in path.read_text().splitlines():
            text = json.loads(row)["text"].lower()
            words.update(w for w, _ in split.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(dest)
    return len(vocab)
