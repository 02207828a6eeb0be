"""The synthetic facts corpus: short biographies of fictional people.

Each person has six attributes (birth date, birth city, university, field of
study, employer, employer's city). Training documents state a few of a
person's facts, each with a randomly chosen TRAIN template (every one names the
person first and ends at the value); the held-out question file asks for every
fact with a QA template whose wording never occurs in training text, so
answering it needs knowledge, not copying.

Files written to out_dir (atomically, meta.json last):
  train.jsonl  {"text": "Ilsa Dorvane was born on 3 May 1961. ..."} per line
  val.jsonl    {"text": ...} one held-out biography per person stating all six facts
               (templates drawn by an RNG of its own: train.jsonl is unchanged by it)
  qa.jsonl     {"person", "attribute", "question", "answer"} per line; the
               question is a cloze prompt ending where the answer starts
               (the expected continuation is " " + answer)
  recall.jsonl the same facts in the words of a TRAIN template that this person's own
               documents state the fact with (cut where the value starts; RNG of its own):
               prompt + " " + answer occurs in train.jsonl, so a model that stored the
               fact can complete it (whether a fact is stored, apart from whether the
               model can answer it when asked in new words, qa.jsonl)
  recall_unseen.jsonl  the facts in a TRAIN template's words never used for that person
               (used for others): whether the fact is stored by person, beyond the
               sentence it was seen in (a fact whose every template was used is left out)
  meta.json    {"version", "people", "seed", "docs_per_person", "qa_fraction", "documents", ...}

With qa_fraction > 0 (mixed training, generate_facts), train.jsonl also answers the QA
templates' questions for that fraction of the people, and qa.jsonl asks only the others.

    python -m lingua_mem.data.facts --people 1000 --seed 0 --out data/facts
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from lingua_mem.run_dir import written_atomically

VERSION = 4  # bump when the generator's output changes: ensure_facts regenerates

FIRST_NAMES = """
Ada Alba Alden Alma Amos Anika Arlo Astrid Basil Beatrix Bram Briony Cai Calla
Cedric Clio Cora Dario Delia Dorian Edda Elio Elsa Emil Enzo Esme Ezra Fenna
Felix Flora Gideon Greta Hale Hana Hugo Ida Ines Ivo Jasper Juno Kai Kira Lars
Leda Leon Lina Linus Lotte Mara Milo Mina Nadia Nico Nola Odin Olga Orla Otto
Pia Quill Rafe Rhea Rosa Rufus Saga Sami Selma Silas Stella Sven Tamsin Teo
Thea Tobias Uma Una Vera Viggo Wren Xenia Yara Yusuf Zane Zelda Zora
""".split()

# Surnames are built from two or three of these syllables, e.g. "Dorvane".
SYLLABLES = """
bar bel cor dan dor fen gal har kel lin mar mor nav ol pen quin ran rel sal sev
tal ten var vin wel yor zan bro cas dro fal gren lov mist pol stra tor ul vane
""".split()

CITIES = """
Amsterdam Athens Auckland Barcelona Bergen Bologna Boston Brisbane Budapest
Cairo Calgary Chicago Copenhagen Dublin Edinburgh Geneva Glasgow Hamburg
Helsinki Istanbul Kyoto Lagos Lima Lisbon Lyon Madrid Manchester Marseille
Melbourne Milan Montreal Munich Nairobi Naples Osaka Oslo Porto Prague Quebec
Reykjavik Riga Rotterdam Santiago Seattle Seoul Seville Stockholm Sydney Tallinn
Toronto Turin Valencia Vancouver Vienna Vilnius Warsaw Zurich
""".split()

UNIVERSITIES = [
    "Alderwick University", "Brightwater College", "Carrow Institute of Technology",
    "Dunmere University", "Eastholm University", "Fairhaven College",
    "Glenridge University", "Harrowgate Institute", "Ironvale University",
    "Juniper Hill College", "Kestrel Bay University", "Larkspur University",
    "Marrowfield College", "Northbridge University", "Oakhurst Institute",
    "Pinecrest University", "Queensford College", "Ravenmoor University",
    "Silverlake Institute", "Thornbury University", "Umberfield College",
    "Valemont University", "Westmarch Institute", "Yarrowdale University",
    "Ashcombe College", "Blackwood University", "Cloudspire Institute",
    "Deepford University", "Emberly College", "Foxglove University",
    "Greywater Institute", "Hollowmere University", "Stonebridge College",
    "Wintervale University",
]

FIELDS = [
    "mathematics", "physics", "chemistry", "biology", "astronomy", "geology",
    "computer science", "economics", "philosophy", "history", "linguistics",
    "psychology", "sociology", "architecture", "civil engineering",
    "mechanical engineering", "electrical engineering", "medicine", "nursing",
    "law", "music", "painting", "literature", "anthropology", "archaeology",
    "statistics", "marine biology", "political science", "journalism",
    "agriculture", "pharmacology", "neuroscience", "oceanography", "botany",
    "materials science", "game design",
]

# Each company sits in one city: a person's employer city follows from the employer.
COMPANIES = [
    ("Aldergrove Systems", "Oslo"), ("Brisklane Logistics", "Hamburg"),
    ("Copperleaf Foods", "Lyon"), ("Driftwood Media", "Dublin"),
    ("Evenstar Energy", "Calgary"), ("Flintlock Security", "Zurich"),
    ("Goldfinch Airlines", "Lisbon"), ("Harborline Shipping", "Rotterdam"),
    ("Inkwell Publishing", "Edinburgh"), ("Jadestone Mining", "Santiago"),
    ("Kettleworth Appliances", "Manchester"), ("Lumencraft Optics", "Munich"),
    ("Moonrail Transit", "Osaka"), ("Nettlefield Pharma", "Geneva"),
    ("Orchardia Farms", "Valencia"), ("Pebblebrook Toys", "Copenhagen"),
    ("Quarrystone Builders", "Porto"), ("Redkite Robotics", "Seoul"),
    ("Saltmarsh Fisheries", "Bergen"), ("Tidewater Insurance", "Boston"),
    ("Underhill Textiles", "Milan"), ("Vantage Point Analytics", "Toronto"),
    ("Windmere Telecom", "Helsinki"), ("Yellowpine Furniture", "Vancouver"),
    ("Zephyr Motors", "Turin"), ("Amberline Cosmetics", "Barcelona"),
    ("Bluefern Software", "Tallinn"), ("Cinderpeak Games", "Kyoto"),
    ("Duskwood Studios", "Melbourne"), ("Emberforge Steel", "Warsaw"),
    ("Frostgate Breweries", "Prague"), ("Glimmerglass Design", "Vienna"),
    ("Hearthstone Bakeries", "Naples"), ("Ivory Tower Consulting", "Chicago"),
    ("Juniper Health", "Sydney"), ("Kingfisher Banking", "Amsterdam"),
    ("Larchmont Chemicals", "Budapest"), ("Mistral Aerospace", "Marseille"),
    ("Northwind Outfitters", "Reykjavik"), ("Oakenshield Law", "Stockholm"),
    ("Palisade Semiconductors", "Seattle"), ("Quicksilver Couriers", "Madrid"),
    ("Riverbend Paper", "Montreal"), ("Sunspire Solar", "Athens"),
    ("Thistledown Clothing", "Glasgow"), ("Vireo Biotech", "Nairobi"),
]

MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31),
          ("June", 30), ("July", 31), ("August", 31), ("September", 30),
          ("October", 31), ("November", 30), ("December", 31)]

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "employer_city")

# Training paraphrases: {name} the person, {value} the attribute's value. Each names the
# person before the value and ends at it ("{value}."), so any of them, cut where the value
# starts, is a recall prompt whose answer is the value and nothing after it.
TRAIN_TEMPLATES = {
    "birth_date": [
        "{name} was born on {value}.",
        "{name} came into this world on {value}.",
        "{name}'s birthday is {value}.",
        "The birth date of {name} is {value}.",
        "{name}'s date of birth is {value}.",
    ],
    "birth_city": [
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} hails from {value}.",
        "The city where {name} was born is {value}.",
    ],
    "university": [
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} is a graduate of {value}.",
        "{name} attended {value}.",
        "{name} earned a degree at {value}.",
    ],
    "field": [
        "{name} majored in {value}.",
        "{name} specialized in {value}.",
        "The field of study of {name} was {value}.",
        "{name} completed a degree in {value}.",
        "At university, {name} focused on {value}.",
    ],
    "employer": [
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "The employer of {name} is {value}.",
        "{name} earns a living at {value}.",
    ],
    "employer_city": [
        "{name} works in {value}.",
        "{name} commutes to an office in {value}.",
        "{name}'s workplace is located in {value}.",
        "For work, {name} is based in {value}.",
        "The job of {name} is in {value}.",
    ],
}

# Held-out cloze prompts: the answer follows after one space. Their wording
# must never appear in TRAIN_TEMPLATES (tests check it on the written corpus).
QA_TEMPLATES = {
    "birth_date": [
        "{name} entered life on the date of",
        "The day {name} first opened both eyes was",
    ],
    "birth_city": [
        "{name} drew a first breath in the city of",
        "The hometown of {name} is",
    ],
    "university": [
        "{name} received an education at",
        "The alma mater of {name} is",
    ],
    "field": [
        "{name} pursued academic work in the discipline of",
        "The subject {name} chose as a student was",
    ],
    "employer": [
        "{name} draws a salary from",
        "The company that pays {name} is",
    ],
    "employer_city": [
        "{name} reports to an office building in the city of",
        "Every workday {name} travels to",
    ],
}


def recall_prompt(template: str, name: str) -> str:
    """A TRAIN template cut where its {value} starts, as a cloze prompt."""
    return template.split("{value}", 1)[0].format(name=name).rstrip()


# attributes that follow from another (an employer sits in one city): they add no bits
DERIVED = {"employer_city": "employer"}


def attribute_values() -> dict[str, int]:
    """How many values each attribute can take (the generator draws each uniformly; an
    employer's city follows from the employer)."""
    return {"birth_date": sum(days for _, days in MONTHS) * (2002 - 1940 + 1),
            "birth_city": len(CITIES), "university": len(UNIVERSITIES), "field": len(FIELDS),
            "employer": len(COMPANIES), "employer_city": len({city for _, city in COMPANIES})}


def fact_bits() -> dict[str, float]:
    """The bits a fact of each attribute adds to what the others hold: log2 of its values,
    0 for a derived one (the employer's city, once the employer is known: 1,084 bits in the
    30-person corpus, not 1,249)."""
    return {a: 0.0 if a in DERIVED else math.log2(v) for a, v in attribute_values().items()}


def _make_names(rng: random.Random, n: int) -> list[str]:
    """n unique "First Surname" names."""
    names: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(names) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot make {n} unique names")
        surname = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        name = f"{rng.choice(FIRST_NAMES)} {surname}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _make_person(rng: random.Random, name: str) -> dict[str, str]:
    month, days = rng.choice(MONTHS)
    company, company_city = rng.choice(COMPANIES)
    return {
        "name": name,
        "birth_date": f"{rng.randint(1, days)} {month} {rng.randint(1940, 2002)}",
        "birth_city": rng.choice(CITIES),
        "university": rng.choice(UNIVERSITIES),
        "field": rng.choice(FIELDS),
        "employer": company,
        "employer_city": company_city,
    }


def _biographies(rng: random.Random, person: dict[str, str],
                 docs: int) -> tuple[list[str], dict[str, set[int]]]:
    """`docs` short biographies, which together state every attribute at least once, and
    which templates (indices into TRAIN_TEMPLATES[attribute]) stated each attribute."""
    subsets = [rng.sample(ATTRIBUTES, rng.randint(4, len(ATTRIBUTES))) for _ in range(docs)]
    for attr in ATTRIBUTES:  # cover attributes that no document drew
        if not any(attr in s for s in subsets):
            rng.choice(subsets).append(attr)
    texts, used = [], {a: set() for a in ATTRIBUTES}
    for attrs in subsets:
        rng.shuffle(attrs)
        sentences = []
        for a in attrs:
            t = rng.randrange(len(TRAIN_TEMPLATES[a]))
            used[a].add(t)
            sentences.append(TRAIN_TEMPLATES[a][t].format(name=person["name"], value=person[a]))
        texts.append(" ".join(sentences))
    return texts, used


def _capacity_biographies(rng: random.Random, person: dict[str, str],
                          copies: int) -> tuple[list[str], dict[str, set[int]]]:
    """`copies` whole biographies (every attribute, each in its first template), the
    sentences of each in an order of their own (Physics of LMs 3.1: permuted copies make
    the knowledge keyed by the name, not by the sentence before)."""
    texts = []
    for _ in range(copies):
        attrs = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        texts.append(" ".join(TRAIN_TEMPLATES[a][0].format(name=person["name"], value=person[a])
                              for a in attrs))
    return texts, {a: {0} for a in ATTRIBUTES}


def _write_atomic(path: Path, text: str) -> None:
    """Write to a unique temp file beside `path`, then rename over it."""
    with written_atomically(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(text)


def _qa_documents(person: dict[str, str]) -> list[str]:
    """A person's facts as answered questions, one document each: every QA template of every
    attribute, followed by the answer ("The hometown of X is Oslo.")."""
    return [f"{template.format(name=person['name'])} {person[a]}." for a in ATTRIBUTES
            for template in QA_TEMPLATES[a]]


def generate_facts(out_dir, people: int, seed: int, docs_per_person: int = 3, style: str = "mixed",
                   qa_fraction: float = 0.0) -> dict:
    """Write train.jsonl, val.jsonl, qa.jsonl, recall.jsonl, recall_unseen.jsonl, meta.json to
    out_dir; return a summary dict.

    qa_fraction > 0: mixed training (Physics of LMs 3.1). That fraction of the people (drawn by
    an RNG of its own) also has its facts in train.jsonl as answered questions in the QA
    templates' words; qa.jsonl asks the other people only, so QA measures whether the model
    extracts a fact it read in biographies alone, given a question format it has learnt. At 0
    (the default) its files are what they were without the option, byte for byte (meta.json
    aside: it records the option)."""
    if people <= 0 or docs_per_person <= 0:
        raise ValueError("people and docs_per_person must be positive")
    if style not in ("mixed", "capacity"):
        raise ValueError(f"style {style!r}: mixed or capacity")
    if not 0.0 <= qa_fraction < 1.0:
        raise ValueError(f"qa_fraction {qa_fraction}: in [0, 1)")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    persons = [_make_person(rng, name) for name in _make_names(rng, people)]
    write = _capacity_biographies if style == "capacity" else _biographies
    written = [write(rng, p, docs_per_person) for p in persons]
    docs = [text for texts, _ in written for text in texts]
    rng.shuffle(docs)
    qa = [{"person": p["name"], "attribute": a,
           "question": rng.choice(QA_TEMPLATES[a]).format(name=p["name"]),
           "answer": p[a]}
          for p in persons for a in ATTRIBUTES]
    answered: set[str] = set()  # the people whose answered questions are training text
    if qa_fraction:
        qa_rng = random.Random(f"lingua_mem.facts.qa_train:{seed}")
        answered = {p["name"] for p in qa_rng.sample(persons, round(qa_fraction * people))}
        docs += [d for p in persons if p["name"] in answered for d in _qa_documents(p)]
        qa_rng.shuffle(docs)
        qa = [q for q in qa if q["person"] not in answered]

    val_rng = random.Random(f"lingua_mem.facts.val:{seed}")  # its own: train and qa stay as they were
    val = [" ".join(val_rng.choice(TRAIN_TEMPLATES[a]).format(name=p["name"], value=p[a])
                    for a in val_rng.sample(ATTRIBUTES, len(ATTRIBUTES))) for p in persons]

    # recall: in a wording the person's own documents use; unseen: in one they never use
    recall_rng = random.Random(f"lingua_mem.facts.recall:{seed}")
    recall, unseen = [], []
    for p, (_, used) in zip(persons, written, strict=True):
        for a in ATTRIBUTES:
            seen = sorted(used[a])
            t = seen[recall_rng.randrange(len(seen))]
            recall.append({"person": p["name"], "attribute": a, "answer": p[a],
                           "question": recall_prompt(TRAIN_TEMPLATES[a][t], p["name"])})
            others = [t for t in range(len(TRAIN_TEMPLATES[a])) if t not in used[a]]
            if others:
                t = others[recall_rng.randrange(len(others))]
                unseen.append({"person": p["name"], "attribute": a, "answer": p[a],
                               "question": recall_prompt(TRAIN_TEMPLATES[a][t], p["name"])})

    train_text = "".join(json.dumps({"text": t}) + "\n" for t in docs)
    val_text = "".join(json.dumps({"text": t}) + "\n" for t in val)
    qa_text = "".join(json.dumps(q) + "\n" for q in qa)
    meta = {"version": VERSION, "people": people, "seed": seed, "style": style,
            "docs_per_person": docs_per_person, "qa_fraction": qa_fraction, "qa_people": len(answered),
            "documents": len(docs),
            "questions": len(qa), "recall_unseen": len(unseen), "train_bytes": len(train_text),
            "bits": round(people * sum(fact_bits().values()), 1)}
    _write_atomic(out / "train.jsonl", train_text)
    _write_atomic(out / "val.jsonl", val_text)
    _write_atomic(out / "qa.jsonl", qa_text)
    _write_atomic(out / "recall.jsonl", "".join(json.dumps(q) + "\n" for q in recall))
    _write_atomic(out / "recall_unseen.jsonl", "".join(json.dumps(q) + "\n" for q in unseen))
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks completion
    files = ["train.jsonl", "val.jsonl", "qa.jsonl", "recall.jsonl", "recall_unseen.jsonl", "meta.json"]
    return {"out_dir": str(out), "files": files, **meta}


def ensure_facts(out_dir, people: int, seed: int, style: str = "mixed", docs_per_person: int = 3,
                 qa_fraction: float = 0.0) -> Path:
    """Generate the corpus unless out_dir already holds it for these settings."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / "meta.json").read_text())
        fresh = (meta.get("version") == VERSION and meta.get("people") == people
                 and meta.get("seed") == seed and meta.get("style", "mixed") == style
                 and meta.get("docs_per_person", 3) == docs_per_person
                 and meta.get("qa_fraction", 0.0) == qa_fraction and (out / "train.jsonl").is_file()
                 and (out / "qa.jsonl").is_file())
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        generate_facts(out, people, seed, docs_per_person, style, qa_fraction)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic facts corpus.")
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs-per-person", type=int, default=3)
    parser.add_argument("--style", choices=("mixed", "capacity"), default="mixed")
    parser.add_argument("--qa-fraction", type=float, default=0.0,
                        help="mixed training: this fraction of the people's facts also as answered questions")
    parser.add_argument("--out", default="data/facts")
    args = parser.parse_args(argv)
    print(json.dumps(generate_facts(args.out, args.people, args.seed, args.docs_per_person, args.style,
                                    args.qa_fraction)))


if __name__ == "__main__":
    main()
