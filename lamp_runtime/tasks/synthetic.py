"""Four small labelled tasks, generated from templates and word lists, for tuning soft prompts.

There is no dataset hub to download from, so every example is built here from a string-seeded
`random.Random`: the same task and seed always give the same rows, on any machine and under any
PYTHONHASHSEED. Each row is `{"input": str, "target": str}`.

Tasks and targets (the target is the exact expected completion text, with no leading space;
the trainer decides how to join it to the prompt):
- sentiment:      review -> `positive` | `negative`
- topic:          news snippet -> `sports` | `business` | `science` | `politics`
- extract:        sentence about a person -> `name=<First Last>; age=<NN>; city=<City>`
- support_triage: support message -> `billing` | `shipping` | `technical` | `account` | `other`,
                  governed by the long rule set in `LONG_INSTRUCTION` (the text a soft prompt is
                  distilled to replace)

Run `python -m lamp_runtime.tasks.synthetic --out prompts/data --seed 0` to write
`<out>/<task>/{train,eval}.jsonl` for every task.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Every extract target matches this; tests and evaluation can use it to check the format.
EXTRACT_TARGET_PATTERN = (
    r"^name=[A-Z][a-z]+ [A-Z][a-z]+; age=\d{2}; city=[A-Z][a-z]+(?: [A-Z][a-z]+)*$"
)

# A slot is redrawn this many times before we conclude the template space is exhausted.
MAX_DRAWS_PER_ROW = 500


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    instruction: str
    labels: tuple[str, ...] | None
    # Draws one row for the requested label (None for extraction, which has no label set).
    make_row: Callable[[random.Random, str | None], dict[str, str]]

    def generate(self, n: int, seed: int) -> list[dict[str, str]]:
        """n rows with distinct inputs; labels are balanced to within one row."""
        return draw_unique_rows(self, n, random.Random(f"{self.name}:{seed}"), exclude=set())


def draw_unique_rows(
    task: TaskSpec, n: int, rng: random.Random, exclude: set[str]
) -> list[dict[str, str]]:
    """n rows whose inputs are distinct from each other and from `exclude`.

    Labels are assigned round-robin before drawing so every split is balanced by construction,
    then the rows are shuffled so the label order carries no signal.
    """
    if n < 0:
        raise ValueError(f"number of rows must be >= 0, got {n}")
    seen = set(exclude)
    rows = []
    for index in range(n):
        label = task.labels[index % len(task.labels)] if task.labels else None
        for _ in range(MAX_DRAWS_PER_ROW):
            row = task.make_row(rng, label)
            if row["input"] not in seen:
                break
        else:
            raise ValueError(
                f"task {task.name!r}: only {len(rows)} distinct inputs found, {n} requested; "
                "the template space is too small for this many rows"
            )
        seen.add(row["input"])
        rows.append(row)
    rng.shuffle(rows)
    return rows


def _lower_first(sentence: str) -> str:
    """Lowercase the first letter so a sentence can follow a connective, but keep the pronoun I."""
    if sentence.startswith(("I ", "I'")):
        return sentence
    return sentence[:1].lower() + sentence[1:]


# --- sentiment ---------------------------------------------------------------------------------

REVIEW_DOMAINS = {
    "product": (
        ["blender", "backpack", "desk lamp", "coffee maker", "phone case", "rain jacket"],
        ["build quality", "design", "price", "packaging", "manual", "battery"],
    ),
    "movie": (
        ["thriller", "comedy", "documentary", "sci-fi film", "animated movie", "period drama"],
        ["plot", "acting", "soundtrack", "pacing", "ending", "script", "cinematography"],
    ),
    "restaurant": (
        ["pizza place", "sushi bar", "taqueria", "bistro", "ramen shop", "diner", "steakhouse"],
        ["food", "service", "atmosphere", "menu", "dessert", "wine list"],
    ),
}
INTENSIFIERS = ["", "", "really", "truly", "absolutely", "surprisingly", "genuinely", "pretty"]
ADJECTIVES = {
    "positive": ["excellent", "fantastic", "superb", "wonderful", "impressive", "outstanding",
                 "lovely", "great", "solid", "delightful"],
    "negative": ["terrible", "awful", "disappointing", "poor", "dreadful", "mediocre", "bland",
                 "frustrating", "subpar", "forgettable"],
}
# Negated phrases whose meaning is the opposite of their adjective: "not bad" is positive.
NEGATED_PHRASES = {
    "positive": ["not bad at all", "far from disappointing", "anything but boring", "never dull",
                 "not half bad", "better than I feared"],
    "negative": ["not great", "far from impressive", "nothing special", "not worth it",
                 "not as good as I hoped", "hardly memorable"],
}
VERDICTS = {
    "positive": ["I would recommend it to anyone.", "Definitely worth it.", "I'm glad I tried it.",
                 "I would happily go for it again.", "Worth every penny."],
    "negative": ["I would not recommend it.", "Not worth the money.", "I regret it.",
                 "Never again.", "What a waste."],
}
REVIEW_TEMPLATES = [
    "The {aspect} of this {thing} was {adj}.",
    "Honestly, the {aspect} was {negated}.",
    "The {aspect} was {opposite_adj}, but the {aspect2} was {adj}. {verdict}",
    "Although the {aspect} was {opposite_adj}, the {aspect2} was {negated}. {verdict}",
    "{verdict} The {aspect} was {adj} and the {aspect2} was {negated}.",
    "Tried this {thing} last week: {adj} {aspect}, {adj2} {aspect2}.",
    "I expected a lot from this {thing}. The {aspect} was {negated}. {verdict}",
]


def make_review_row(rng: random.Random, label: str | None) -> dict[str, str]:
    """A review whose overall verdict is `label`; mixed templates put a contrary clause first."""
    opposite = "negative" if label == "positive" else "positive"
    things, aspects = REVIEW_DOMAINS[rng.choice(sorted(REVIEW_DOMAINS))]
    aspect, aspect2 = rng.sample(aspects, 2)
    text = rng.choice(REVIEW_TEMPLATES).format(
        thing=rng.choice(things), aspect=aspect, aspect2=aspect2,
        adj=f"{rng.choice(INTENSIFIERS)} {rng.choice(ADJECTIVES[label])}".strip(),
        adj2=rng.choice(ADJECTIVES[label]),
        opposite_adj=rng.choice(ADJECTIVES[opposite]),
        negated=rng.choice(NEGATED_PHRASES[label]),
        verdict=rng.choice(VERDICTS[label]),
    )
    return {"input": text, "target": label}


# --- topic -------------------------------------------------------------------------------------

# Per topic: (actors, actions, follow-up sentences). Actors and actions combine freely.
TOPIC_VOCABULARY = {
    "sports": (
        ["The home side", "The defending champions", "The veteran striker", "The tennis star",
         "The rookie quarterback", "The national team", "The young sprinter"],
        ["won the final in extra time", "signed a two-year contract extension",
         "was ruled out for the season with a knee injury", "broke the tournament scoring record",
         "was knocked out in the semifinals", "qualified for the world championships"],
        ["Fans celebrated long into the night.", "The next match is scheduled for Sunday.",
         "Tickets for the rematch sold out."],
    ),
    "business": (
        ["The retailer", "A regional airline", "The chipmaker", "The startup", "The carmaker",
         "The bank", "The steel producer"],
        ["reported record quarterly profits", "announced plans to cut 300 jobs",
         "agreed to buy a smaller rival", "missed analysts' revenue forecasts",
         "saw its shares fall 6 percent", "filed for bankruptcy protection"],
        ["Investors reacted cautiously to the news.", "Its shares closed slightly higher.",
         "The deal still needs approval from regulators."],
    ),
    "science": (
        ["A team of astronomers", "Researchers at the university", "The space agency",
         "Marine biologists", "A group of physicists", "Climate scientists", "Geneticists"],
        ["discovered a new planet orbiting a nearby star", "launched a probe to study the Sun",
         "published a study on antibiotic resistance", "measured record ocean temperatures",
         "sequenced the genome of an ancient plant", "observed a rare particle decay"],
        ["The findings were published in a peer-reviewed journal.",
         "The team plans further experiments next year.",
         "Other labs are now trying to reproduce the result."],
    ),
    "politics": (
        ["The prime minister", "Opposition lawmakers", "The senate", "The governor",
         "The foreign minister", "The ruling coalition", "The city council"],
        ["called for an early election", "vetoed the spending bill", "won a confidence vote",
         "met the president for talks on trade", "announced a cabinet reshuffle",
         "passed a law to reform the tax code"],
        ["The opposition criticised the decision.", "A final vote is expected next month.",
         "Polls suggest voters are divided on the issue."],
    ),
}
# Shared by every topic, so the label must come from the topic-specific words, not the framing.
NEWS_TIMES = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday",
              "on Saturday", "late on Sunday", "earlier this week", "this morning"]
NEWS_PLACES = [" in Madrid", " in Chicago", " in Nairobi", " in Sydney", " in Toronto",
               " in Seoul", " in Lyon", " in Lima", ""]
NEWS_SOURCES = ["officials said", "according to a statement", "a spokesperson said",
                "local media reported"]
NEWS_FILLER = ["Further details are expected later this week.",
               "The announcement drew mixed reactions online.",
               "Officials declined to comment further.", "More updates will follow."]


def make_news_row(rng: random.Random, label: str | None) -> dict[str, str]:
    """A one- or two-sentence snippet built from the topic's actors, actions and follow-ups."""
    actors, actions, follow_ups = TOPIC_VOCABULARY[label]
    actor, action = rng.choice(actors), rng.choice(actions)
    when, where = rng.choice(NEWS_TIMES), rng.choice(NEWS_PLACES)
    framings = [
        f"{actor} {action} {when}{where}.",
        f"{actor} {action}{where}, {rng.choice(NEWS_SOURCES)} {when}.",
        f"{when[0].upper()}{when[1:]}, {_lower_first(actor)} {action}{where}.",
    ]
    text = rng.choice(framings)
    second = rng.random()
    if second < 0.4:
        text += " " + rng.choice(follow_ups)
    elif second < 0.7:
        text += " " + rng.choice(NEWS_FILLER)
    return {"input": text, "target": label}


# --- extract -----------------------------------------------------------------------------------

FIRST_NAMES = ["Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Omar", "Elena",
               "Noah", "Chloe", "Mateo", "Hana", "Lucas", "Amara", "Diego", "Ingrid", "Tomas",
               "Yara", "Felix", "Nadia", "Samuel", "Leila", "Victor"]
LAST_NAMES = ["Lopez", "Smith", "Khan", "Tanaka", "Rossi", "Murphy", "Patel", "Haddad", "Petrova",
              "Becker", "Martin", "Silva", "Kim", "Novak", "Okafor", "Garcia", "Larsen", "Dubois",
              "Nguyen", "Fischer", "Mendes", "Cohen", "Ahmed", "Walsh"]
CITIES = ["Denver", "Austin", "Boston", "Seattle", "Portland", "San Diego", "New Orleans",
          "Chicago", "Toronto", "Dublin", "Lisbon", "Berlin", "Oslo", "Madrid", "Cape Town",
          "Buenos Aires", "Melbourne", "Osaka", "Nairobi", "Vienna"]
EXTRACT_TEMPLATES = [
    "{name}, {age}, moved to {city} in {year}.",
    "{name} is {age} years old and lives in {city}.",
    "After {years} years in {other_city}, {age}-year-old {name} relocated to {city}.",
    "{name} ({age}) from {city} ordered a {item} on {weekday}.",
    "At {age}, {name} opened a small {business} in {city}.",
    "The {event} in {city} was organised by {name}, who is {age}.",
    "{name}, a {age}-year-old {job} based in {city}, booked a trip to {other_city}.",
    "Born and raised in {other_city}, {name} now lives in {city} and turned {age} this year.",
]


def make_person_row(rng: random.Random, label: str | None) -> dict[str, str]:
    """A sentence about one person; distractor cities and years test that the right city is kept."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    # 20-79 keeps "a {age}-year-old" grammatical (no "an 18-" or "an 80-").
    age = rng.randint(20, 79)
    city, other_city = rng.sample(CITIES, 2)
    text = rng.choice(EXTRACT_TEMPLATES).format(
        name=name, age=age, city=city, other_city=other_city,
        year=rng.randint(2005, 2023), years=rng.randint(2, 15),
        item=rng.choice(["bicycle", "laptop", "sofa", "camera", "tent"]),
        weekday=rng.choice(["Monday", "Wednesday", "Friday", "Saturday"]),
        business=rng.choice(["bakery", "bookshop", "cafe", "bike shop", "gallery"]),
        event=rng.choice(["charity run", "book fair", "jazz night", "food festival"]),
        job=rng.choice(["nurse", "architect", "teacher", "engineer", "chef", "designer"]),
    )
    return {"input": text, "target": f"name={name}; age={age}; city={city}"}


# --- support_triage ----------------------------------------------------------------------------

# Tie-break rule 1 of LONG_INSTRUCTION: when a message raises several issues, the earliest wins.
SUPPORT_PRIORITY = ("account", "billing", "shipping", "technical", "other")

LONG_INSTRUCTION = """\
You are the triage assistant for the customer support team of Northwind Home, an online store \
that sells small home electronics (kettles, smart lamps, speakers, robot vacuums) and ships them \
to customers' doors. Read one customer message and assign exactly one routing label so that the \
message reaches the right team. Reply with the label only, in lowercase, with no punctuation and \
no explanation.

Labels:
- account: getting into or managing the Northwind account: cannot log in, forgotten or reset \
password, two-factor codes that never arrive, a locked account, a suspicious sign-in, changing \
the email or address saved on the profile, closing the account.
- billing: anything about money: a charge the customer does not recognise, being charged twice, \
refunds, invoices and receipts, updating a card, subscription prices, promo codes not applied.
- shipping: the physical journey of an order: where a package is, tracking, late or missing \
deliveries, a parcel left at the wrong address, changing the delivery address of one order, an \
item damaged in transit, the wrong item in the box, delivery times.
- technical: a product or the app that does not work as it should: a device that will not turn \
on, pair, connect to Wi-Fi or update, error messages, crashes, setup and how-to questions.
- other: everything else: compliments, product suggestions, questions about showroom hours or \
jobs, press or partnership enquiries.

Tie-break rules, applied in order:
1. If a message raises more than one issue, choose the label that comes first in this list: \
account, billing, shipping, technical, other.
2. A request for money back is billing, even when the reason is a lost delivery or a faulty device.
3. An item that arrived broken because of the delivery is shipping; an item that arrived intact \
and later stopped working is technical.
4. Changing the address of one order is shipping; changing the address saved on the profile is \
account.
5. Greetings, thanks, order numbers and signatures never change the label.

Examples:
"I was charged twice for order #48213, please fix it." -> billing
"My kettle arrived with a cracked lid, the box was crushed." -> shipping
"The lamp will not pair with the app since the last update." -> technical
"Someone logged into my account from another country." -> account
"Just wanted to say the speaker sounds amazing!" -> other
"The parcel never showed up and I want my money back." -> billing"""

# Six openers per label; several deliberately use another label's words (tie-break rules 2-4).
SUPPORT_SENTENCES = {
    "account": [
        "I can't log in to my account even after resetting my password.",
        "The two-factor code never arrives when I try to sign in.",
        "I got an alert about a sign-in from {country} that was not me.",
        "Please change the email address on my profile to my new work email.",
        "I would like to close my Northwind account permanently.",
        "Can you update the home address saved on my profile? I moved last month.",
    ],
    "billing": [
        "I was charged twice for order {order}.",
        "There is a charge of ${amount} on my card that I don't recognise.",
        "I returned the {product} {days} days ago and still have no refund.",
        "My promo code was not applied and I paid full price for the {product}.",
        "The {product} from order {order} never arrived, so I want my money back.",
        "The {product} stopped working after {days} days and I would like a refund.",
    ],
    "shipping": [
        "Where is order {order}? The tracking has not updated since {day}.",
        "The {product} arrived in a crushed box and the {part} is cracked.",
        "The tracking for order {order} says delivered but there is no parcel at my door.",
        "I received the {other_product} instead of the {product} I ordered.",
        "Can I change the delivery address for order {order}? I will be away next week.",
        "How long does delivery to {country} usually take?",
    ],
    "technical": [
        "My {product} will not turn on even when it is plugged in.",
        "The {product} keeps disconnecting from my Wi-Fi.",
        "The firmware update for my {product} fails with error {code}.",
        "The {product} arrived in perfect condition but stopped working after {days} days.",
        "I can't pair the {product} with my phone over Bluetooth.",
        "The app shows error {code} when I try to add a new device.",
    ],
    "other": [
        "Just wanted to say the {product} is fantastic, thank you!",
        "Do you have any job openings in your support team?",
        "Will you ever sell a larger version of the {product}?",
        "I run a home tech blog and would love to review your products.",
        "Your delivery driver was really friendly today.",
        "Is the {product} made with recycled materials?",
    ],
}
SUPPORT_PRODUCTS = ["kettle", "smart lamp", "speaker", "robot vacuum", "air purifier", "toaster",
                    "desk fan", "smart plug"]
GREETINGS = ["", "", "Hi!", "Hello!", "Hi there!", "Good morning!", "Hello support team!"]
SIGN_OFFS = ["", "", "Thanks.", "Thanks in advance!", "Regards, {first}", "Cheers, {first}",
             "Please help."]
CONNECTIVES = ["Also, ", "On top of that, ", "Separately, ", "And "]


def _support_slots(rng: random.Random) -> dict[str, str]:
    product, other_product = rng.sample(SUPPORT_PRODUCTS, 2)
    return {
        "product": product,
        "other_product": other_product,
        "order": f"#{rng.randint(10000, 99999)}",
        "amount": f"{rng.randint(5, 300)}.{rng.randint(0, 99):02d}",
        "days": str(rng.randint(2, 30)),
        "day": rng.choice(["Monday", "Tuesday", "Thursday", "Friday", "the weekend"]),
        "country": rng.choice(["Brazil", "Germany", "Japan", "Canada", "Kenya", "Spain"]),
        "part": rng.choice(["lid", "base", "casing", "handle", "front panel"]),
        "code": f"E{rng.randint(100, 999)}",
        "first": rng.choice(FIRST_NAMES),
    }


def make_support_row(rng: random.Random, label: str | None) -> dict[str, str]:
    """A message for `label`, sometimes with a second, lower-priority issue (tie-break rule 1)."""
    slots = _support_slots(rng)
    sentences = [rng.choice(SUPPORT_SENTENCES[label]).format(**slots)]
    lower_priority = SUPPORT_PRIORITY[SUPPORT_PRIORITY.index(label) + 1:]
    if lower_priority and rng.random() < 0.5:
        # The second issue is about the other product, so the two sentences never contradict.
        swapped = {**slots, "product": slots["other_product"], "other_product": slots["product"]}
        distractor = rng.choice(SUPPORT_SENTENCES[rng.choice(lower_priority)]).format(**swapped)
        # The lower-priority issue may come first, so position cannot stand in for priority.
        if rng.random() < 0.5:
            sentences.insert(0, distractor)
        else:
            sentences.append(rng.choice(CONNECTIVES) + _lower_first(distractor))
    parts = [rng.choice(GREETINGS), *sentences, rng.choice(SIGN_OFFS).format(**slots)]
    return {"input": " ".join(part for part in parts if part), "target": label}


# --- registry and I/O --------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sentiment", "Short product, movie and restaurant reviews, labelled by sentiment.",
            "Classify the overall sentiment of the review. "
            "Answer with exactly one word: positive or negative.",
            ("positive", "negative"), make_review_row,
        ),
        TaskSpec(
            "topic", "One- or two-sentence news snippets, labelled by topic.",
            "Classify the topic of the news snippet. "
            "Answer with exactly one word: sports, business, science or politics.",
            ("sports", "business", "science", "politics"), make_news_row,
        ),
        TaskSpec(
            "extract", "Sentences about a person, mapped to their name, age and current city.",
            "Extract the person's full name, age and the city they live in now. "
            "Answer in the format name=<full name>; age=<number>; city=<city>.",
            None, make_person_row,
        ),
        TaskSpec(
            "support_triage", "Support messages routed by the long rule set in LONG_INSTRUCTION.",
            LONG_INSTRUCTION,
            ("billing", "shipping", "technical", "account", "other"), make_support_row,
        ),
    )
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def zero_shot_prompt(task: str | TaskSpec, input_text: str) -> str:
    """The baseline prompt: the task's instruction, the input, and an answer cue."""
    return f"{get_task(task).instruction}\n\nInput: {input_text}\nAnswer:"


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_splits(
    task_name: str, out_dir: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write `<out_dir>/<task_name>/{train,eval}.jsonl` and return (train_path, eval_path).

    Eval rows come from their own random stream and exclude every train input, so no eval input
    was seen in training.
    """
    task = get_task(task_name)
    train_rows = task.generate(n_train, seed)
    eval_rng = random.Random(f"{task.name}:{seed}:eval")
    eval_rows = draw_unique_rows(task, n_eval, eval_rng, exclude={r["input"] for r in train_rows})
    task_dir = Path(out_dir) / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = task_dir / "train.jsonl", task_dir / "eval.jsonl"
    _write_jsonl(train_path, train_rows)
    _write_jsonl(eval_path, eval_rows)
    return train_path, eval_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write train/eval JSONL splits for every task.")
    parser.add_argument("--out", default="prompts/data", help="gets one folder per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=100)
    args = parser.parse_args(argv)
    for name in TASKS:
        train_path, eval_path = write_splits(name, args.out, args.n_train, args.n_eval, args.seed)
        print(f"{name}: train={args.n_train} -> {train_path}, eval={args.n_eval} -> {eval_path}")


if __name__ == "__main__":
    main()
