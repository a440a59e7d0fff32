"""The embedded world: a deterministic, fictional multi-hop knowledge base with its corpus and QA sets.

A seeded generator invents countries, cities, companies and people, links them by relations
(person --born_in--> city --in_country--> country; person --works_for--> company --headquartered_in--> city;
company --founded_by--> person; country --capital--> city) and writes:

    corpus.jsonl                  one document per entity, Search-R1 corpus rows {"id", "contents": "\"Title\"\\ntext"}
    {train,test}.jsonl            questions {"id", "question", "golden_answers", "type", "supporting_docs", "split"}
    {train,test}.parquet          the same questions in Search-R1's parquet layout (data_source, prompt, ability,
                                  reward_model.ground_truth.target, extra_info.split/index)
    world.json                    the entities and relations, plus the generation parameters

Each document states only its own entity's facts, so a 2-hop question ("In which country was X born?") needs two
retrievals: X's document names the city, the city's document names the country. Question types:
1-hop (one fact of one entity), 2-hop (a chain of two facts), comparison (a numeric attribute of two entities).
Nothing depends on Python's hash seed or the machine: the same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rexrag_fast.paths import default_cache_dir

# Part of the cache directory name: bump it whenever the generator's output changes, so stale caches are not reused.
WORLD_FORMAT_VERSION = 2

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]

_OCCUPATIONS = ["cartographer", "chemist", "violinist", "architect", "botanist", "engineer", "novelist",
                "painter", "astronomer", "surgeon", "historian", "sculptor", "economist", "linguist", "pilot",
                "geologist", "photographer", "mathematician", "playwright", "glassblower"]
_INDUSTRIES = ["shipbuilding", "textile", "software", "mining", "publishing", "pharmaceutical", "brewing",
               "aerospace", "railway", "clockmaking", "telecommunications", "porcelain"]
_REGIONS = ["the Northern Reach", "the Amber Coast", "the Vell Archipelago", "the Southern Steppe",
            "the Grey Highlands", "the Lantern Isles"]
_CURRENCY_SUFFIX = ["mark", "crown", "florin", "dinar", "sol", "thaler"]
_COMPANY_SUFFIX = ["Industries", "Works", "Holdings", "Company", "Group", "Foundry", "Guild", "Labs"]


@dataclasses.dataclass
class WorldConfig:
    """Sizes of a generated world. The default gives ~2,000 documents and ~4,000 questions."""

    seed: int = 0
    n_countries: int = 30
    n_cities: int = 240
    n_companies: int = 200
    n_people: int = 1500
    n_questions: int = 4000
    test_fraction: float = 0.1

    def validate(self) -> None:
        for name in ("n_countries", "n_cities", "n_companies", "n_people", "n_questions"):
            if getattr(self, name) < 2:
                raise ValueError(f"WorldConfig.{name} must be >= 2, got {getattr(self, name)}")
        if self.n_cities < self.n_countries:
            raise ValueError(f"WorldConfig.n_cities ({self.n_cities}) must be >= n_countries "
                             f"({self.n_countries}): every country needs a capital")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"WorldConfig.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclasses.dataclass
class World:
    """A generated world: entities (by kind), corpus documents and questions.

    `entities[kind]` is a list of dicts with at least "name" and "doc_id"; relations are stored as entity names.
    `documents` are corpus rows {"id", "contents"}; `questions` are dicts with "id", "question",
    "golden_answers", "type" ("1hop" | "2hop" | "comparison"), "supporting_docs" and "split".
    """

    config: WorldConfig
    entities: dict[str, list[dict[str, Any]]]
    documents: list[dict[str, str]]
    questions: list[dict[str, Any]]

    def split(self, name: str) -> list[dict[str, Any]]:
        """Questions of one split ("train" or "test")."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return [q for q in self.questions if q["split"] == name]

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write corpus.jsonl, {train,test}.jsonl, {train,test}.parquet and world.json into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / "corpus.jsonl", self.documents)
        for split in ("train", "test"):
            rows = self.split(split)
            _write_jsonl(out / f"{split}.jsonl", rows)
            write_search_r1_parquet(out / f"{split}.parquet", rows, split)
        meta = {"format_version": WORLD_FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                "entities": self.entities, "counts": {"documents": len(self.documents),
                                                      "questions": len(self.questions)}}
        (out / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        return out

    @classmethod
    def load(cls, world_dir: str | os.PathLike[str]) -> World:
        """Read a world written by `save`."""
        wdir = Path(world_dir)
        meta_path = wdir / "world.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{wdir} is not a world directory: {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != WORLD_FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta.get('format_version')!r}, "
                             f"expected {WORLD_FORMAT_VERSION}; regenerate it")
        documents = _read_jsonl(wdir / "corpus.jsonl")
        questions = _read_jsonl(wdir / "train.jsonl") + _read_jsonl(wdir / "test.jsonl")
        questions.sort(key=lambda q: int(q["id"].rsplit("-", 1)[1]))
        return cls(WorldConfig(**meta["config"]), meta["entities"], documents, questions)


def generate_world(config: WorldConfig | None = None, **overrides: Any) -> World:
    """Generate a world deterministically from `config` (or WorldConfig(**overrides))."""
    if config is None:
        config = WorldConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    rng = random.Random(config.seed)
    names = _NameFactory(rng)

    countries = []
    for i in range(config.n_countries):
        name = names.place()
        countries.append({"name": name, "region": rng.choice(_REGIONS),
                          "currency": f"{name} {rng.choice(_CURRENCY_SUFFIX)}",
                          "founded": rng.randint(800, 1900), "doc_id": f"country-{i}"})
    cities = []
    for i in range(config.n_cities):
        # The first n_countries cities are the capitals, one per country, so every country has one.
        country = countries[i] if i < config.n_countries else rng.choice(countries)
        cities.append({"name": names.place(), "country": country["name"],
                       "population": rng.randrange(20_000, 5_000_000, 1_000),
                       "founded": rng.randint(900, 1950), "river": names.place() + " River",
                       "doc_id": f"city-{i}"})
    for i, country in enumerate(countries):
        country["capital"] = cities[i]["name"]
    people = []
    for i in range(config.n_people):
        people.append({"name": names.person(), "born": rng.randint(1850, 2000),
                       "birthplace": rng.choice(cities)["name"], "occupation": rng.choice(_OCCUPATIONS),
                       "doc_id": f"person-{i}"})
    companies = []
    for i in range(config.n_companies):
        companies.append({"name": f"{names.place()} {rng.choice(_COMPANY_SUFFIX)}",
                          "industry": rng.choice(_INDUSTRIES), "founded": rng.randint(1800, 2015),
                          "founder": people[i % len(people)]["name"],
                          "headquarters": rng.choice(cities)["name"], "doc_id": f"company-{i}"})
    for person in people:
        person["employer"] = rng.choice(companies)["name"]

    entities = {"country": countries, "city": cities, "company": companies, "person": people}
    documents = [_document(kind, e) for kind in ("country", "city", "company", "person") for e in entities[kind]]
    questions = _questions(entities, config, rng)
    return World(config, entities, documents, questions)


def default_world_dir(seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the default world (WorldConfig(seed=seed)), generated on first use.

    Generation writes into a temporary sibling directory and renames it into place, so concurrent first uses
    (several test workers, several ranks) never see a half-written world.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wdir = root / f"world-v{WORLD_FORMAT_VERSION}-seed{seed}"
    if (wdir / "world.json").is_file():
        return wdir
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{wdir.name}-", dir=root))
    try:
        generate_world(seed=seed).save(tmp)
        try:
            tmp.rename(wdir)
        except OSError:
            if not (wdir / "world.json").is_file():  # not a lost race with another writer: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return wdir


def write_search_r1_parquet(path: str | os.PathLike[str], questions: Iterable[dict[str, Any]],
                            split: str) -> None:
    """Write questions in Search-R1's parquet layout.

    Row: {"data_source": "world_<type>", "prompt": [{"role": "user", "content": question}],
          "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
          "extra_info": {"split": split, "index": i}}. The prompt holds the bare question; the agent wraps it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": f"world_{q['type']}",
             "prompt": [{"role": "user", "content": q["question"]}],
             "ability": "fact-reasoning",
             "reward_model": {"style": "rule", "ground_truth": {"target": list(q["golden_answers"])}},
             "extra_info": {"split": split, "index": i}}
            for i, q in enumerate(questions)]
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()),
                                    ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))


class _NameFactory:
    """Unique pronounceable fictional names drawn from syllables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _word(self, syllables: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.rng.choice(_CODAS)).capitalize()

    def _unique(self, make: Any) -> str:
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name

    def place(self) -> str:
        return self._unique(lambda: self._word(self.rng.randint(2, 3)))

    def person(self) -> str:
        return self._unique(lambda: f"{self._word(self.rng.randint(1, 2))} {self._word(self.rng.randint(2, 3))}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _document(kind: str, e: dict[str, Any]) -> dict[str, str]:
    n = e["name"]
    if kind == "country":
        text = (f"{n} is a country in {e['region']}. Its capital is {e['capital']}. The currency of {n} is the "
                f"{e['currency']}, and the country was established in {e['founded']}.")
    elif kind == "city":
        text = (f"{n} is a city in {e['country']}, on the banks of the {e['river']}. {n} was founded in "
                f"{e['founded']} and has a population of {e['population']:,}.")
    elif kind == "company":
        text = (f"{n} is {_article(e['industry'])} {e['industry']} company founded in {e['founded']} "
                f"by {e['founder']}. "
                f"Its headquarters are in {e['headquarters']}.")
    else:
        text = (f"{n} (born {e['born']}) is {_article(e['occupation'])} {e['occupation']}. {n} was born in the city of "
                f"{e['birthplace']} and works for {e['employer']}.")
    return {"id": e["doc_id"], "contents": f'"{n}"\n{text}'}


def _questions(entities: dict[str, list[dict[str, Any]]], config: WorldConfig,
               rng: random.Random) -> list[dict[str, Any]]:
    by_name = {kind: {e["name"]: e for e in es} for kind, es in entities.items()}
    people, cities = entities["person"], entities["city"]
    companies, countries = entities["company"], entities["country"]

    def q1() -> tuple[str, list[str], list[str]]:
        kind = rng.choice(["born_in", "works_for", "born_year", "founder", "hq", "city_country", "capital"])
        if kind == "born_in":
            p = rng.choice(people)
            return f"In which city was {p['name']} born?", [p["birthplace"]], [p["doc_id"]]
        if kind == "works_for":
            p = rng.choice(people)
            return f"Which company does {p['name']} work for?", [p["employer"]], [p["doc_id"]]
        if kind == "born_year":
            p = rng.choice(people)
            return f"In what year was {p['name']} born?", [str(p["born"])], [p["doc_id"]]
        if kind == "founder":
            c = rng.choice(companies)
            return f"Who founded {c['name']}?", [c["founder"]], [c["doc_id"]]
        if kind == "hq":
            c = rng.choice(companies)
            return f"In which city are the headquarters of {c['name']}?", [c["headquarters"]], [c["doc_id"]]
        if kind == "city_country":
            c = rng.choice(cities)
            return f"In which country is the city of {c['name']}?", [c["country"]], [c["doc_id"]]
        c = rng.choice(countries)
        return f"What is the capital of {c['name']}?", [c["capital"]], [c["doc_id"]]

    def q2() -> tuple[str, list[str], list[str]]:
        kind = rng.choice(["birth_country", "employer_hq", "employer_founder", "employer_year", "capital_of"])
        p = rng.choice(people)
        emp = by_name["company"][p["employer"]]
        if kind == "birth_country":
            city = by_name["city"][p["birthplace"]]
            return (f"In which country was {p['name']} born?", [city["country"]], [p["doc_id"], city["doc_id"]])
        if kind == "employer_hq":
            return (f"In which city are the headquarters of the company that {p['name']} works for?",
                    [emp["headquarters"]], [p["doc_id"], emp["doc_id"]])
        if kind == "employer_founder":
            return (f"Who founded the company that {p['name']} works for?", [emp["founder"]],
                    [p["doc_id"], emp["doc_id"]])
        if kind == "employer_year":
            return (f"In what year was the employer of {p['name']} founded?", [str(emp["founded"])],
                    [p["doc_id"], emp["doc_id"]])
        city = rng.choice(cities)
        country = by_name["country"][city["country"]]
        return (f"What is the capital of the country where {city['name']} is located?", [country["capital"]],
                [city["doc_id"], country["doc_id"]])

    def cmp() -> tuple[str, list[str], list[str]]:
        kind = rng.choice(["older", "bigger", "company_older"])
        pool, key = {"older": (people, "born"), "bigger": (cities, "population"),
                     "company_older": (companies, "founded")}[kind]
        a, b = rng.sample(pool, 2)
        while a[key] == b[key]:
            a, b = rng.sample(pool, 2)
        if kind == "older":
            text, win = f"Who was born first, {a['name']} or {b['name']}?", min(a, b, key=lambda e: e[key])
        elif kind == "bigger":
            text = f"Which city has the larger population, {a['name']} or {b['name']}?"
            win = max(a, b, key=lambda e: e[key])
        else:
            text = f"Which company was founded earlier, {a['name']} or {b['name']}?"
            win = min(a, b, key=lambda e: e[key])
        return text, [win["name"]], [a["doc_id"], b["doc_id"]]

    makers = [("1hop", q1, 0.4), ("2hop", q2, 0.4), ("comparison", cmp, 0.2)]
    n_test = max(1, round(config.n_questions * config.test_fraction))
    questions: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(questions) < config.n_questions:
        qtype, make, _ = rng.choices(makers, weights=[w for *_, w in makers])[0]
        text, answers, support = make()
        if text in seen:
            continue
        seen.add(text)
        i = len(questions)
        questions.append({"id": f"world-{i}", "question": text, "golden_answers": answers, "type": qtype,
                          "supporting_docs": support, "split": "test" if i < n_test else "train"})
    return questions


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
