"""A generated multi-hop lookup task with a local in-memory search tool: the tool-use task of ERL
(`megatron_step.rl.erl`), and the RL stage's tool-use task (`rl.task: lookup`, `LookupTask`).

    from megatron_step.rl.lookup import SearchTool, lookup_problems, make_world, prompt_text, solution_text
    world = make_world(seed=0)                                  # people, cities, countries, companies
    train = lookup_problems(world, 1000, seed=1)                # questions that need 2 lookups
    heldout = lookup_problems(world, 50, seed=1, split="heldout")
    p = train[0]
    prompt_text(p)      # "Q: In which country was Rita born?\\nA:"
    solution_text(p)    # " First: <search> Rita born_in</search> <result> Rita born_in Riga</result>
                        #   Then: <search> Riga in_country</search> <result> Riga in_country Estria</result>
                        #   <answer> Estria</answer>"   (one line)
    SearchTool(world).search("Rita born_in")                    # "Rita born_in Riga"
    SearchTool(world).search("Rita lives_in")                   # "no result"

The world is fictional on purpose (cities are assigned to made-up countries at random): a question
is answered by looking facts up, not by what a pretrained model knows.

Rollout protocol (text): the model writes `<search> SUBJECT RELATION</search>`; the tool's answer is
inserted after it as ` <result> ...</result>` (teacher-forced into the KV cache, never sampled, and
excluded from the loss); the final step writes `<answer> X</answer>`. The space after each opening tag
is deliberate: a name then has the same word-initial pieces in the question, the query, the result
and the answer (SentencePiece marks a word start), so a model copies pieces it has already seen.
`solution_segments` gives the gold trajectory as (text, forced) pieces: a supervised warm-up must
tokenize it piece by piece, exactly as a rollout does (sampled text, then `encode(format_result(...))`),
or the warm-up's token boundaries around the results would differ from the ones the policy meets while
generating.

Splits: a question is "heldout" iff sha256(question) mod 10 == 0 (as `megatron_step.rl.tasks`), a
property of the question text alone; the world is shared by both splits (the tool must answer both).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_step.rl.rewards import extract_answer
from megatron_step.rl.tasks import SPLITS, split_of

__all__ = [
    "ANSWER_CLOSE",
    "NO_RESULT",
    "RESULT_CLOSE",
    "SEARCH_CLOSE",
    "SEARCH_OPEN",
    "LookupConfig",
    "LookupProblem",
    "LookupTask",
    "SearchTool",
    "World",
    "extract_answer",
    "extract_query",
    "format_result",
    "lookup_problems",
    "lookup_reward",
    "make_world",
    "prompt_text",
    "solution_segments",
    "solution_text",
    "split_of",
]

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
ANSWER_CLOSE = "</answer>"
NO_RESULT = "no result"


def _names(words: str) -> tuple[str, ...]:
    return tuple(words.split())


# Name pools: one word each (a query is "SUBJECT RELATION", split on whitespace) and disjoint across
# kinds, so every name denotes one entity. Countries are invented: the world is fictional.
PEOPLE = _names(
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Ken Laura Mike Nina Oscar Paul Quinn Rita Sam "
    "Tina Uma Victor Wendy Xena Yuri Zoe Adam Bella Chris Diana Eric Fiona George Hannah Igor Jack Kate Leo "
    "Mia Noah"
)
CITIES = _names("Paris Rome Oslo Lima Cairo Delhi Tokyo Quito Riga Bern Kyiv Lagos Perth Seoul Dakar Hanoi")
COUNTRIES = _names("Norland Estria Valora Karsk Mirea Tolvia Zembla Orsino")
COMPANIES = _names("Acme Globex Initech Umbrella Hooli Vandelay Wonka Stark Wayne Cyberdyne")

# relation chains -> question template; the first relation's subject kind is the question's subject
TEMPLATES: dict[tuple[str, ...], str] = {
    ("born_in", "in_country"): "In which country was {} born?",
    ("works_for", "based_in"): "In which city is the employer of {} based?",
    ("in_country", "capital"): "What is the capital of the country {} is in?",
    ("born_in", "in_country", "capital"): "What is the capital of the country where {} was born?",
    ("works_for", "based_in", "in_country"): "In which country is the employer of {} based?",
}
_SUBJECT_KIND = {"born_in": "person", "works_for": "person", "in_country": "city"}


@dataclass(frozen=True)
class World:
    """Facts (subject, relation, object). Relations: person born_in city, person works_for company,
    company based_in city, city in_country country, country capital city (a city of that country)."""

    facts: tuple[tuple[str, str, str], ...]
    people: tuple[str, ...]
    cities: tuple[str, ...]

    def lookup(self, subject: str, relation: str) -> str | None:
        """The object of (subject, relation), None if the world has no such fact."""
        return self._index().get((subject, relation))

    def _index(self) -> dict[tuple[str, str], str]:
        # built on first use and cached on the instance (frozen: object.__setattr__)
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {(s, r): o for s, r, o in self.facts}
            object.__setattr__(self, "_idx", idx)
        return idx


def make_world(
    seed: int, n_people: int = 40, n_cities: int = 16, n_countries: int = 8, n_companies: int = 10
) -> World:
    """A world, a pure function of the arguments. Names are the first n of each pool; the seed decides
    the relations. Every country gets at least one city (its capital is one of its cities)."""
    for name, n, pool in (
        ("n_people", n_people, PEOPLE),
        ("n_cities", n_cities, CITIES),
        ("n_countries", n_countries, COUNTRIES),
        ("n_companies", n_companies, COMPANIES),
    ):
        if not isinstance(n, int) or not 1 <= n <= len(pool):
            raise ValueError(f"{name} must be an int in [1, {len(pool)}] (the name pool's size), got {n!r}")
    if n_cities < n_countries:
        raise ValueError(f"n_cities({n_cities}) must be >= n_countries({n_countries}): each needs a city")
    rng = random.Random(seed)
    people, cities = PEOPLE[:n_people], CITIES[:n_cities]
    countries, companies = COUNTRIES[:n_countries], COMPANIES[:n_companies]
    order = list(cities)
    rng.shuffle(order)
    # the first n_countries shuffled cities give each country one city; the rest go anywhere
    country_of = {c: countries[i] if i < n_countries else rng.choice(countries) for i, c in enumerate(order)}
    facts = []
    for c in cities:
        facts.append((c, "in_country", country_of[c]))
    for k in countries:
        facts.append((k, "capital", rng.choice([c for c in cities if country_of[c] == k])))
    for co in companies:
        facts.append((co, "based_in", rng.choice(cities)))
    for p in people:
        facts.append((p, "born_in", rng.choice(cities)))
        facts.append((p, "works_for", rng.choice(companies)))
    return World(facts=tuple(facts), people=tuple(people), cities=tuple(cities))


class SearchTool:
    """The local "search engine": `search("Alice born_in")` -> "Alice born_in Rome", or "no result"
    for anything that is not exactly "SUBJECT RELATION" of a known fact (whitespace-insensitive,
    case-sensitive). `calls` counts searches."""

    def __init__(self, world: World):
        self.world = world
        self.calls = 0

    def search(self, query: str) -> str:
        self.calls += 1
        words = query.split()
        if len(words) != 2:
            return NO_RESULT
        obj = self.world.lookup(words[0], words[1])
        return NO_RESULT if obj is None else f"{words[0]} {words[1]} {obj}"


@dataclass(frozen=True)
class LookupProblem:
    """One question; frozen: problems are values."""

    prompt: str  # the question, e.g. "In which country was Alice born?"
    answer: str  # the last hop's object, e.g. "Valora"
    hops: tuple[tuple[str, str, str], ...]  # the facts to look up, in order; hops[i+1][0] == hops[i][2]
    key: str  # the question itself: a stable id, and what decides the split


def _chain(world: World, subject: str, relations: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    hops, s = [], subject
    for r in relations:
        o = world.lookup(s, r)
        if o is None:
            raise ValueError(f"world has no fact ({s}, {r}, ?)")
        hops.append((s, r, o))
        s = o
    return tuple(hops)


def lookup_problems(
    world: World, n: int, seed: int, split: str = "train", min_hops: int = 2, max_hops: int = 2
) -> list[LookupProblem]:
    """`n` questions of `split`, drawn with replacement (uniformly) from every question of the world
    whose template has min_hops..max_hops lookups; a pure function of the arguments. At the default
    world there are 40 * 2 + 16 = 96 two-hop questions (about a tenth held out) and 80 three-hop ones."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    hop_counts = sorted({len(k) for k in TEMPLATES})
    if min_hops not in hop_counts:
        raise ValueError(f"min_hops must be one of {hop_counts}, got {min_hops!r}")
    if max_hops not in hop_counts or max_hops < min_hops:
        raise ValueError(f"max_hops({max_hops!r}) must be one of {hop_counts} and >= min_hops({min_hops})")
    pool = []
    for relations, template in TEMPLATES.items():
        if not min_hops <= len(relations) <= max_hops:
            continue
        subjects = world.people if _SUBJECT_KIND[relations[0]] == "person" else world.cities
        for s in subjects:
            q = template.format(s)
            if split_of(q) == split:
                hops = _chain(world, s, relations)
                pool.append(LookupProblem(prompt=q, answer=hops[-1][2], hops=hops, key=q))
    if not pool:
        raise ValueError(f"the world has no {split!r} questions with {min_hops}..{max_hops} hops")
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def prompt_text(problem: LookupProblem) -> str:
    """What the policy reads: "Q: " + question + "\\nA:" (as the arithmetic task)."""
    return f"Q: {problem.prompt}\nA:"


def format_result(result: str) -> str:
    """The teacher-forced text after a `</search>`: " <result> " + the tool's answer + "</result>"."""
    return f" {RESULT_OPEN} {result}{RESULT_CLOSE}"


def extract_query(text: str) -> str | None:
    """The query of a step's text: what stands between the last <search> before the first </search>
    and that </search> (the whole text before </search> when there is no <search>), stripped; None
    when the text has no </search>."""
    end = text.find(SEARCH_CLOSE)
    if end < 0:
        return None
    head = text[:end]
    start = head.rfind(SEARCH_OPEN)
    return (head[start + len(SEARCH_OPEN) :] if start >= 0 else head).strip()


def solution_segments(problem: LookupProblem) -> list[tuple[str, bool]]:
    """The gold trajectory as (text, forced) pieces: per hop the model's " First: <search> S R</search>"
    (" Then: ..." after the first; forced=False) then the tool's result (forced=True), then
    " <answer> X</answer>". The "First:" / "Then:" lead is the step's reasoning part (what ERL's query
    scope keeps; 3 pieces). Raises ValueError if the hops are not a chain ending at the answer."""
    if not problem.hops:
        raise ValueError(f"problem {problem.key!r} has no hops")
    for a, b in zip(problem.hops, problem.hops[1:]):
        if b[0] != a[2]:
            raise ValueError(f"problem {problem.key!r}: hop {b} does not start at {a[2]!r}")
    if problem.hops[-1][2] != problem.answer:
        raise ValueError(
            f"problem {problem.key!r}: last hop {problem.hops[-1]} is not answer {problem.answer!r}"
        )
    out = []
    for k, (s, r, o) in enumerate(problem.hops, 1):
        lead = "First" if k == 1 else "Then"
        out.append((f" {lead}: {SEARCH_OPEN} {s} {r}{SEARCH_CLOSE}", False))
        out.append((format_result(f"{s} {r} {o}"), True))
    out.append((f" <answer> {problem.answer}{ANSWER_CLOSE}", False))
    return out


def solution_text(problem: LookupProblem) -> str:
    """The gold trajectory as one string (the pieces of `solution_segments` joined)."""
    return "".join(t for t, _ in solution_segments(problem))


def lookup_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 iff the response's first <answer> is exactly `reference` (stripped), else 0.0. The reward
    signature of `megatron_step.rl.rewards`; `prompt` is unused."""
    return float(extract_answer(response) == reference.strip())


# ---------------------------------------------------------------------------------------------------
# The RL stage's tool-use task (`rl.task: lookup`)
# ---------------------------------------------------------------------------------------------------
@dataclass
class LookupConfig:
    """The lookup task of the RL stage (`rl.lookup.<field>`): which world, how many hops a question
    needs. Ours: one world for every run (seed 0) and 2-hop questions, which the tiny CPU model
    learns to route through the tool within a few hundred warm-up steps (docs/benchmarks.md)."""

    world_seed: int = 0
    min_hops: int = 2
    max_hops: int = 2

    def __post_init__(self):
        hops = sorted({len(k) for k in TEMPLATES})
        if self.min_hops not in hops or self.max_hops not in hops or self.max_hops < self.min_hops:
            raise ValueError(
                f"rl.lookup.min_hops={self.min_hops}, max_hops={self.max_hops}: each one of {hops}, "
                "min_hops <= max_hops"
            )


@dataclass(frozen=True)
class LookupTask:
    """Multi-hop lookup questions answered through the search tool (a `rl.tasks.Task` with a tool):
    its rollouts go through the tool loop (`megatron_step.rl.erl`; rl.rollout=erl adds rollbacks),
    its warm-up learns the gold trajectories with the tool's results outside the loss (`segments`),
    its reward is the exact final answer (`lookup_reward`)."""

    cfg: LookupConfig = field(default_factory=LookupConfig)

    @property
    def world(self) -> World:
        return make_world(self.cfg.world_seed)

    def _problems(self, n: int, seed: int, split: str) -> list[LookupProblem]:
        return lookup_problems(self.world, n, seed, split, self.cfg.min_hops, self.cfg.max_hops)

    def train(self, n: int, seed: int) -> list[LookupProblem]:
        return self._problems(n, seed, "train")

    def heldout(self, n: int, seed: int) -> list[LookupProblem]:
        return self._problems(n, seed, "heldout")

    def prompt(self, problem: LookupProblem) -> str:
        return prompt_text(problem)

    def reference(self, problem: LookupProblem) -> str:
        return problem.answer

    def solution(self, problem: LookupProblem) -> str:
        return solution_text(problem)

    def segments(self, problem: LookupProblem) -> list[tuple[str, bool]]:
        """The gold trajectory as (text, forced) pieces, forced = written by the tool (no loss)."""
        return solution_segments(problem)

    def correct(self, problem: LookupProblem, response: str) -> bool:
        return lookup_reward("", response, problem.answer) == 1.0

    def tool(self) -> SearchTool:
        """A fresh search tool over the task's world (one per sampler: `calls` counts its searches)."""
        return SearchTool(self.world)

    def reward(self):
        """The task's reward function when rl.reward_fn is unset (module level: it pickles into the
        reward workers)."""
        return lookup_reward
