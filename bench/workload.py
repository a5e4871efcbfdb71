"""What the benchmarks send: memory-like texts, questions and request bodies, the same for a seed.

Two corpora, both filled in by one ``Vocabulary``: the load generator's (``Workload``, which every
HTTP benchmark and the crash harness use) and bench/embedded.py's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Vocabulary:
    """The words a corpus's templates name as ``{slots}``, and the ranges of its ``{numbers}``."""

    words: dict[str, tuple[str, ...]]
    numbers: dict[str, tuple[int, int]]

    def fill(self, template: str, rng: random.Random) -> str:
        """``template`` with one random word per slot, then one number per range, drawn in the
        order listed: a seed gives the same texts as long as the lists stay as they are."""
        picked: dict[str, Any] = {slot: rng.choice(options) for slot, options in self.words.items()}
        picked |= {slot: rng.randint(low, high) for slot, (low, high) in self.numbers.items()}
        return template.format(**picked)


# -- the load generator's corpus -------------------------------------------------------------

WORDS = Vocabulary(
    words={
        "n": (
            "Alice", "Bilal", "Carmen", "Dmitri", "Esther", "Farid", "Gwen", "Hiro", "Ines", "Jakob", "Kemi", "Luis",
            "Mirela", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Stefan", "Tamar", "Ulla", "Victor", "Wen",
            "Ximena", "Yusuf", "Zoe", "Anouk", "Benedikt", "Chidi", "Dagny",
        ),
        "person": (
            "sister", "brother", "wife", "husband", "partner", "son", "daughter", "mother", "father", "manager",
            "team lead", "flatmate", "best friend", "accountant", "physiotherapist", "piano teacher", "mentor",
        ),
        "place": (
            "Porto", "Munich", "Osaka", "Montreal", "Accra", "Hobart", "Minneapolis", "Valencia", "Busan", "Galway",
            "Oaxaca", "Aarhus", "Durban", "Victoria", "Glasgow", "Penang", "Denver", "Brno", "Lyon", "Tallinn",
        ),
        "dish": (
            "green curry", "poke bowls", "miso ramen", "margherita pizza", "pistachio gelato", "flat whites",
            "fish tacos", "red lentil dal", "smoked mackerel", "porcini risotto", "halloumi wraps", "cold brew",
            "shakshuka", "bibimbap", "pierogi", "pho",
        ),
        "condition": (
            "a tree nut allergy", "coeliac disease", "lactose intolerance", "a shellfish allergy", "hay fever",
            "migraines", "a bad knee", "type 1 diabetes", "mild asthma", "a penicillin allergy",
        ),
        "activity": (
            "rock climbing", "playing the violin", "open-water swimming", "pottery", "go", "astronomy", "knitting",
            "sourdough baking", "tango", "fly fishing", "film photography", "learning Portuguese", "beekeeping",
            "cycling", "improv theatre", "calligraphy", "volunteering at a food bank",
        ),
        "app": (
            "Things", "a bullet journal", "Outlook", "Logseq", "Trello", "sticky notes", "Asana", "Apple Reminders",
            "a Kanban board", "plain text files",
        ),
        "work": (
            "the payments rewrite", "the Android release", "the annual budget", "the cloud cost review",
            "the customer portal", "the analytics dashboard", "the vendor contract", "the compliance audit",
            "the team offsite", "the API deprecation", "the warehouse rollout", "the grant application",
        ),
        "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
        "month": (
            "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
            "November", "December",
        ),
        "animal": (
            "a dachshund", "three cats", "a cockatiel", "a retired greyhound", "two guinea pigs", "a border collie",
        ),
        "genre": (
            "detective novels", "history podcasts", "synthwave", "nature documentaries", "stand-up specials",
            "chess streams", "poetry collections", "space opera audiobooks",
        ),
    },
    numbers={"k": (2, 12), "date": (1, 28), "year": (2010, 2025)},
)
STATEMENTS = (  # (topic, template)
    ("travel", "{n} always asks for an aisle seat and likes to land in {place} before noon."),
    ("health", "{n} has {condition} and wants meal plans and restaurant picks to take it into account."),
    ("family", "{n}'s {person} is coming over from {place} in {month} for about {k} days."),
    ("hobbies", "{n} has been {activity} on {day} evenings for {k} years and is thinking about lessons."),
    ("food", "After a stressful week {n} usually orders {dish} and watches something light."),
    ("work", "{n} tracks everything in {app} and finds chat notifications distracting during focus time."),
    ("work", "{n} owns {work} and the review with their {person} was pushed to late {month}."),
    ("travel", "{n} relocated to {place} in {year} and is still getting used to the weather."),
    ("pets", "{n} looks after {animal} and books a sitter for any trip longer than a weekend."),
    ("family", "Remind {n} about their {person}'s birthday on {month} {date}; they like to send flowers."),
    ("media", "{n} listens to {genre} while commuting and liked the last recommendation a lot."),
    ("work", "{n} felt the call with their {person} about {work} went poorly and wants to prepare better."),
    ("health", "{n} is training for a 10k in {place} in {month} and runs three times a week."),
    ("food", "{n} avoids alcohol at work events and usually orders {dish} or a soda water instead."),
    ("schedule", "{n} keeps {day} mornings free of meetings and does deep work from home that day."),
    ("hobbies", "On weekends {n} prefers {activity}, ideally followed by {dish} with friends."),
    ("family", "{n} reserved a table for {k} in {place} to celebrate their {person}'s new job."),
    ("finance", "{n} is putting money aside for a flat in {place} and wants a budget check every month."),
    ("hobbies", "{n} picked up {activity} after their {person} gave them a starter set for their birthday."),
    ("finance", "{n} was invoiced twice for {work} and asked for a correction before the end of {month}."),
    ("schedule", "{n} is out of office from {month} {date} and asked not to be contacted about {work}."),
    ("media", "{n} dislikes {genre} and asked never to get those as suggestions again."),
    ("health", "{n} sees their {person} every {day} for a bad back and cannot book anything before ten."),
    ("food", "{n} is vegetarian on weekdays but happily eats {dish} when eating out in {place}."),
)
ADDENDA = (
    "They mentioned it twice in the last conversation.",
    "It came up while planning a trip to {place}.",
    "Their {person} confirmed it in an email on {day}.",
    "This seems more important to them than they let on.",
    "They do not expect this to change before {month}.",
    "Only bring it up when it is relevant.",
    "They would like a short list of options by {day}.",
    "Noted after a call that overran by {k} minutes.",
    "They prefer one clear suggestion over many alternatives.",
    "Something similar happened in {place} last year and it worked out fine.",
    "Keep the tone light when mentioning it.",
)
QUESTIONS = (
    "Which seat does {n} prefer when flying?",
    "Does {n} have any allergies or dietary restrictions?",
    "When is {n}'s {person} visiting?",
    "What does {n} do on {day} evenings?",
    "What does {n} eat after a stressful week?",
    "Which app does {n} use for tasks?",
    "What is {n} working on and when is the review?",
    "Where does {n} live now?",
    "Does {n} have pets?",
    "When is {n}'s {person}'s birthday?",
    "What should I suggest {n} listen to on the commute?",
    "How did {n}'s call about {work} go?",
    "Is {n} training for a race?",
    "What does {n} drink at work events?",
    "which mornings is {n} unavailable for meetings",
    "good restaurant in {place} for a celebration",
    "monthly budget check for a flat",
    "duplicate invoice for {work}",
    "{activity} lessons",
    "who gave {n} a starter set",
)


def memory_text(rng: random.Random) -> tuple[str, str]:
    """One (topic, text) pair: a memory-like statement of 10-40 words."""
    topic, template = rng.choice(STATEMENTS)
    words = WORDS.fill(template, rng).split()
    addenda = rng.sample(ADDENDA, 4)
    for extra in addenda[: rng.choice((0, 0, 1, 1, 1, 2, 3))]:
        extra_words = WORDS.fill(extra, rng).split()
        if len(words) + len(extra_words) > 40:
            break
        words += extra_words
    if len(words) < 10:
        words += WORDS.fill(addenda[-1], rng).split()
    return topic, " ".join(words[:40])


def query_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [WORDS.fill(rng.choice(QUESTIONS), rng) for _ in range(n)]


class Workload:
    """Deterministic request bodies: the k-th add, search, ... of a seed are always the
    same, whatever the mix or the concurrency (each operation has its own random stream)."""

    def __init__(self, seed: int = 0, *, namespace: str = "loadtest", users: int = 100,
                 search_scope: str = "user", search_mode: str | None = None, limit: int = 10,
                 batch_size: int = 50) -> None:
        self.namespace = namespace
        self.users = max(1, users)
        self.search_scope = search_scope
        self.search_mode = search_mode
        self.limit = limit
        self.batch_size = batch_size
        self._add_rng = random.Random(f"{seed}:add")
        self._search_rng = random.Random(f"{seed}:search")
        self._misc_rng = random.Random(f"{seed}:misc")

    def user(self, rng: random.Random) -> str:
        return f"user-{rng.randrange(self.users):03d}"

    def memory(self) -> dict[str, Any]:
        rng = self._add_rng
        topic, text = memory_text(rng)
        return {"text": text, "namespace": self.namespace, "user_id": self.user(rng),
                "metadata": {"topic": topic, "source": "loadtest", "priority": rng.randint(1, 3)}}

    def memories(self, n: int) -> list[dict[str, Any]]:
        return [self.memory() for _ in range(n)]

    def search(self) -> dict[str, Any]:
        rng = self._search_rng
        body: dict[str, Any] = {"query": WORDS.fill(rng.choice(QUESTIONS), rng), "namespace": self.namespace,
                                "limit": self.limit}
        user = self.user(rng)
        if self.search_scope == "user":
            body["user_id"] = user
        if self.search_mode:
            body["mode"] = self.search_mode
        return body

    def list_query(self) -> dict[str, str]:
        return {"namespace": self.namespace, "user_id": self.user(self._misc_rng), "limit": str(self.limit)}

    def pick(self, ids: list[str]) -> str:
        return ids[self._misc_rng.randrange(len(ids))]


# -- bench/embedded.py's corpus ----------------------------------------------------------------

EMBEDDED_WORDS = Vocabulary(
    words={
        "name": (
            "Maya", "Jonas", "Priya", "Tom", "Aisha", "Lucas", "Elena", "Kenji", "Sofia", "Omar", "Hannah", "Diego",
            "Grace", "Mateo", "Leila", "Noah", "Ingrid", "Samuel", "Chloe", "Ravi", "Fatima", "Oliver", "Yuki",
            "Bruno", "Amara", "Felix", "Nadia", "Ethan", "Zara", "Marco", "Lina", "Daniel", "Mei", "Isaac", "Clara",
            "Tariq",
        ),
        "relation": (
            "sister", "brother", "manager", "partner", "daughter", "son", "mother", "father", "roommate",
            "best friend", "colleague", "neighbour", "grandmother", "cousin", "landlord", "dentist",
        ),
        "city": (
            "Lisbon", "Berlin", "Tokyo", "Toronto", "Nairobi", "Melbourne", "Chicago", "Barcelona", "Seoul", "Dublin",
            "Mexico City", "Copenhagen", "Cape Town", "Vancouver", "Edinburgh", "Singapore", "Austin", "Prague",
        ),
        "food": (
            "Thai curry", "sushi", "vegan ramen", "sourdough pizza", "dark chocolate", "oat milk lattes",
            "spicy tacos", "lentil soup", "grilled salmon", "mushroom risotto", "falafel wraps", "matcha ice cream",
            "black coffee",
        ),
        "allergy": ("peanuts", "shellfish", "gluten", "lactose", "cats", "penicillin", "pollen", "sesame", "latex"),
        "hobby": (
            "bouldering", "playing the cello", "trail running", "watercolour painting", "chess", "birdwatching",
            "baking bread", "salsa dancing", "woodworking", "sailing", "photography", "learning Japanese",
            "gardening", "playing padel", "writing short stories", "restoring old bikes",
        ),
        "tool": (
            "Notion", "a paper notebook", "Google Calendar", "Obsidian", "Slack reminders", "a whiteboard", "Todoist",
            "email drafts", "voice memos", "a shared spreadsheet",
        ),
        "project": (
            "the billing migration", "the mobile app redesign", "the quarterly report", "the data warehouse move",
            "the onboarding flow", "the search relaunch", "the hiring plan", "the security audit",
            "the conference talk",
        ),
        "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
        "month": (
            "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
            "November", "December",
        ),
        "pet": ("a beagle", "two cats", "a parrot", "a rescue greyhound", "a tortoise", "a golden retriever",
                "rabbits"),
        "seat": ("window", "aisle", "exit-row"),
        "media": ("podcasts about history", "science fiction novels", "jazz records", "true crime documentaries",
                  "Korean dramas", "economics newsletters", "fantasy audiobooks"),
    },
    numbers={"num": (2, 12), "day": (1, 28), "year": (2012, 2025)},
)
EMBEDDED_TEMPLATES = (
    "{name} prefers {seat} seats on long flights and usually books the earliest departure when travelling to {city}.",
    "{name} is allergic to {allergy}, so restaurant suggestions should always avoid dishes that might contain it.",
    "{name}'s {relation} is visiting from {city} in {month} and they are planning a weekend trip together.",
    "{name} has been {hobby} every {weekday} evening for about {num} years and wants to get more serious about it.",
    "{name} mentioned that {food} is their favourite comfort food after a long week at work.",
    "{name} keeps track of tasks in {tool} and dislikes getting reminders by text message.",
    "{name} is leading {project} and the deadline was moved to the end of {month}.",
    "{name} moved to {city} in {year} and still finds the winters there harder than expected.",
    "{name} has {pet} and needs a pet sitter whenever they travel for more than two nights.",
    "{name} asked to be reminded about their {relation}'s birthday on {month} {day}.",
    "{name} enjoys {media} on the commute and asked for new recommendations last {weekday}.",
    "{name} said the meeting with their {relation} about {project} went badly and they feel anxious about it.",
    "{name} wants to run a half marathon in {city} next {month} and is following a sixteen-week plan.",
    "{name} does not drink alcohol and prefers {food} or sparkling water at team dinners.",
    "{name} works remotely on {weekday}s and usually blocks the morning for deep work without meetings.",
    "{name}'s favourite weekend activity is {hobby}, ideally followed by {food} with friends.",
    "{name} booked a table for {num} people in {city} to celebrate their {relation}'s promotion.",
    "{name} is saving for a flat in {city} and wants monthly check-ins about the budget.",
    "{name} recently started {hobby} after their {relation} gave them a beginner kit as a gift.",
    "{name} complained that the invoice for {project} was sent twice and asked for it to be corrected.",
)
EMBEDDED_CLAUSES = (
    "They brought it up again during the last conversation.",
    "This came up while planning the trip to {city}.",
    "Their {relation} confirmed the details by email on {weekday}.",
    "It matters to them more than they usually admit.",
    "They said this is unlikely to change before {month}.",
    "Mention it only if it is relevant to the request.",
    "They asked for a short summary of options before {weekday}.",
    "This was noted after a call that ran over by {num} minutes.",
    "They would rather get one clear suggestion than a long list.",
    "Last year the same thing happened in {city} and it went well.",
)
EMBEDDED_QUESTIONS = (
    "Where does {name} like to sit on flights?",
    "What is {name} allergic to?",
    "When is {name}'s {relation} visiting?",
    "What hobbies does {name} have?",
    "What food does {name} like after a long week?",
    "How does {name} keep track of tasks?",
    "Which project is {name} leading and when is the deadline?",
    "When did {name} move to {city}?",
    "Does {name} have any pets that need a sitter?",
    "When is the birthday of {name}'s {relation}?",
    "What should I recommend to {name} for the commute?",
    "How did {name}'s meeting about {project} go?",
    "Is {name} training for a race in {city}?",
    "What does {name} drink at team dinners?",
    "which days does {name} work remotely",
    "restaurant in {city} for a celebration",
    "budget check-ins for a flat",
    "invoice sent twice for {project}",
)


def embedded_texts(n: int, seed: int) -> list[str]:
    """``n`` varied memory-like statements of 10-40 words of bench/embedded.py's corpus."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = EMBEDDED_WORDS.fill(rng.choice(EMBEDDED_TEMPLATES), rng).split()
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            extra = EMBEDDED_WORDS.fill(rng.choice(EMBEDDED_CLAUSES), rng).split()
            if len(words) + len(extra) > 40:
                break
            words += extra
        out.append(" ".join(words[:40]))
    return out


def embedded_questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [EMBEDDED_WORDS.fill(rng.choice(EMBEDDED_QUESTIONS), rng) for _ in range(n)]
