"""The world model: entities of a few kinds, each with bilingual attribute values, and the held-out split.

Everything the writers produce is a rendering of this one object, so every file agrees on the facts.
The split decides, once, which questions are evaluation-only:
- closed-book: for a share of entities one (entity, attribute) fact is *asked* only in eval; the fact
  itself is still stated in the pretrain documents (knowledge extraction);
- context QA: the passages talk about fresh entities that are not in the world; train and eval
  passages use disjoint name pools, so no eval passage or name occurs in training.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from functools import cached_property

from data.synth.names import NameMaker
from data.synth.scales import Scale

LANGS = ("en", "zh")

# Attribute values as (English, Chinese). English jobs/pets start with a consonant ("a baker").
TOWNS = [("Merro", "梅罗"), ("Tolvan", "托尔万"), ("Asku", "阿斯库"), ("Quillby", "奎尔比"), ("Sarn", "萨恩"),
         ("Velo", "维洛"), ("Ondra", "翁德拉"), ("Hesk", "赫斯克"), ("Brinmoor", "布林莫尔"), ("Caddow", "卡多"),
         ("Lunhaven", "伦黑文"), ("Pellar", "佩拉")]
JOBS = [("baker", "面包师"), ("farmer", "农民"), ("teacher", "老师"), ("doctor", "医生"), ("painter", "画家"),
        ("sailor", "水手"), ("tailor", "裁缝"), ("miner", "矿工"), ("singer", "歌手"), ("potter", "陶工")]
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
           ("white", "白色"), ("black", "黑色"), ("pink", "粉色")]
PETS = [("cat", "猫"), ("dog", "狗"), ("parrot", "鹦鹉"), ("rabbit", "兔子"), ("goat", "山羊"), ("turtle", "乌龟"),
        ("fox", "狐狸"), ("hedgehog", "刺猬")]
PRODUCTS = [("lamps", "灯具"), ("boots", "靴子"), ("clocks", "钟表"), ("kites", "风筝"), ("soap", "肥皂"),
            ("bells", "铃铛"), ("maps", "地图"), ("rope", "绳子")]
YEARS = [(str(y), str(y)) for y in range(1850, 2000)]

# kind -> attribute -> value set. A new kind (or attribute) needs templates in `language.py` too.
KINDS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "person": {"town": TOWNS, "job": JOBS, "colour": COLOURS, "pet": PETS},
    "company": {"year": YEARS, "town": TOWNS, "product": PRODUCTS},
}
COMPANY_SUFFIX = {"en": " Works", "zh": "工坊"}


@dataclass
class Entity:
    id: str
    kind: str
    name: dict[str, str]  # lang -> name
    attrs: dict[str, dict[str, str]]  # attribute -> lang -> value

    def value(self, attr: str, lang: str) -> str:
        return self.attrs[attr][lang]


@dataclass
class World:
    seed: int
    scale: str
    entities: list[Entity]
    closed_eval: set[tuple[str, str]]  # (entity id, attribute) asked only in eval
    # Fresh entities for context QA; only their names and kinds are used (passage values are drawn
    # per passage, so answers must be read, not remembered).
    context_train: list[Entity]  # names for training passages
    context_eval: list[Entity]  # names for held-out passages
    by_id: dict[str, Entity] = field(default_factory=dict)

    def __post_init__(self):
        self.by_id = {e.id: e for e in self.entities}

    @cached_property
    def train_facts(self) -> list[tuple[Entity, str]]:
        """Facts whose questions may be trained on (everything not held out)."""
        return [(e, a) for e in self.entities for a in e.attrs if (e.id, a) not in self.closed_eval]

    @cached_property
    def eval_facts(self) -> list[tuple[Entity, str]]:
        return [(e, a) for e in self.entities for a in e.attrs if (e.id, a) in self.closed_eval]

    @cached_property
    def fully_trained(self) -> list[Entity]:
        """Entities with no held-out attribute: safe to describe in full in SFT answers."""
        held = {eid for eid, _ in self.closed_eval}
        return [e for e in self.entities if e.id not in held]

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "scale": self.scale,
            "entities": [asdict(e) for e in self.entities],
            "heldout": {
                "closed_questions": sorted(f"{eid}.{a}" for eid, a in self.closed_eval),
                "context_train_names": [e.name for e in self.context_train],
                "context_eval_names": [e.name for e in self.context_eval],
            },
        }


def make_entity(rng: random.Random, names: NameMaker, kind: str, eid: str) -> Entity:
    en, zh = names.make()
    name = {"en": en, "zh": zh}
    if kind == "company":
        name = {lang: name[lang] + COMPANY_SUFFIX[lang] for lang in LANGS}
    attrs = {a: dict(zip(LANGS, rng.choice(values))) for a, values in KINDS[kind].items()}
    return Entity(eid, kind, name, attrs)


def build_world(seed: int, scale_name: str, scale: Scale) -> World:
    rng = random.Random(f"world-{seed}")
    names = NameMaker(rng, reserved=TOWNS)
    entities = [make_entity(rng, names, "person", f"p{i:04d}") for i in range(scale.persons)]
    entities += [make_entity(rng, names, "company", f"c{i:04d}") for i in range(scale.companies)]
    held = rng.sample(entities, round(scale.closed_eval_frac * len(entities)))
    closed_eval = {(e.id, rng.choice(sorted(e.attrs))) for e in held}

    def fresh(n: int, tag: str) -> list[Entity]:
        return [make_entity(rng, names, "person" if rng.random() < 0.75 else "company", f"{tag}{i:04d}")
                for i in range(n)]

    ctx_train, ctx_eval = fresh(scale.context_names[0], "xt"), fresh(scale.context_names[1], "xe")
    return World(seed, scale_name, entities, closed_eval, ctx_train, ctx_eval)
