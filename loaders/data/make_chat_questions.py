"""Write ``chat_questions.jsonl``: the chat-accuracy questions shipped with slimserve.

Run ``python loaders/data/make_chat_questions.py`` to regenerate the file (the output is fully
determined by this script; a test checks the shipped file matches it). The questions are meant to
be easy for a 135M instruct model (SmolLM2-135M-Instruct scores near zero on GSM8K), so that a
compressed model's drop is measurable: one-line facts, one-step arithmetic on small numbers, and
instructions whose compliance a string comparison can check. Answers are a word or a number, so
24 generated tokens are plenty.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).with_name("chat_questions.jsonl")

CAPITALS = {
    "France": ["Paris"], "Germany": ["Berlin"], "Italy": ["Rome"], "Spain": ["Madrid"], "Japan": ["Tokyo"],
    "the United Kingdom": ["London"], "Russia": ["Moscow"], "China": ["Beijing", "Peking"], "Egypt": ["Cairo"],
    "Canada": ["Ottawa"], "Greece": ["Athens"], "Portugal": ["Lisbon"], "Ireland": ["Dublin"], "Norway": ["Oslo"],
    "Sweden": ["Stockholm"], "Austria": ["Vienna"], "Poland": ["Warsaw"], "the Netherlands": ["Amsterdam"],
    "Belgium": ["Brussels"], "Thailand": ["Bangkok"], "South Korea": ["Seoul"], "India": ["New Delhi", "Delhi"],
    "Kenya": ["Nairobi"], "Argentina": ["Buenos Aires"], "Mexico": ["Mexico City"], "Peru": ["Lima"],
    "Cuba": ["Havana"], "Finland": ["Helsinki"], "Denmark": ["Copenhagen"], "Hungary": ["Budapest"],
    "Turkey": ["Ankara"], "Australia": ["Canberra"], "the United States": ["Washington"],
}
COLOURS = {
    "the sky on a clear day": ["blue"], "grass": ["green"], "snow": ["white"], "a ripe banana": ["yellow"],
    "coal": ["black"], "a ripe tomato": ["red"], "a carrot": ["orange"], "blood": ["red"],
    "milk chocolate": ["brown"], "milk": ["white"], "a lemon": ["yellow"], "a strawberry": ["red"],
    "a pumpkin": ["orange"], "an emerald": ["green"], "a polar bear's fur": ["white"],
}
ANIMAL_FACTS = [
    ("What sound does a cow make?", ["moo"]),
    ("What sound does a dog make?", ["woof", "bark", "barks", "barking"]),
    ("What sound does a cat make?", ["meow", "miaow", "purr", "purrs"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is a baby dog called?", ["puppy", "pup"]),
    ("What is a baby cat called?", ["kitten"]),
    ("What is a baby cow called?", ["calf"]),
    ("What is a baby sheep called?", ["lamb"]),
    ("What is a baby horse called?", ["foal", "colt", "filly"]),
    ("Which animal has a trunk?", ["elephant", "elephants"]),
    ("Which animal has a very long neck and eats leaves from tall trees?", ["giraffe", "giraffes"]),
    ("Which insect makes honey?", ["bee", "bees", "honeybee", "honey bee"]),
    ("Which animal is famous for black and white stripes?", ["zebra", "zebras"]),
    ("Which bird is a common symbol of peace?", ["dove"]),
    ("What do bees live in?", ["hive", "beehive"]),
    ("What animal says 'oink'?", ["pig", "pigs"]),
    ("Which animal carries its baby in a pouch and hops?", ["kangaroo", "kangaroos"]),
    ("Which sea animal has eight arms?", ["octopus"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth"]),
    ("What is the largest animal on Earth?", ["blue whale", "whale"]),
]
LEG_COUNTS = {"a spider": 8, "a dog": 4, "an insect": 6, "a bird": 2, "a cat": 4, "a horse": 4}
OPPOSITES = {
    "hot": ["cold"], "big": ["small", "little"], "up": ["down"], "day": ["night"], "fast": ["slow"],
    "happy": ["sad", "unhappy"], "open": ["closed", "close", "shut"], "wet": ["dry"], "old": ["young", "new"],
    "tall": ["short"], "full": ["empty"], "left": ["right"], "black": ["white"], "good": ["bad", "evil"],
    "rich": ["poor"], "early": ["late"], "love": ["hate"], "win": ["lose"], "light": ["dark", "heavy"],
    "hard": ["soft", "easy"], "in": ["out"], "yes": ["no"], "push": ["pull"], "first": ["last"],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GENERAL = [
    ("What is the largest planet in our solar system?", ["Jupiter"], "contains"),
    ("Which planet do we live on?", ["Earth"], "contains"),
    ("What is frozen water called?", ["ice"], "contains"),
    ("Which gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"], "contains"),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"], "contains"),
    ("What is the chemical formula of water?", ["H2O"], "contains"),
    ("What is the largest ocean on Earth?", ["Pacific"], "contains"),
    ("At how many degrees Celsius does water boil at sea level?", ["100"], "numeric"),
    ("Which star is at the centre of our solar system?", ["sun"], "contains"),
    ("Which planet is known as the Red Planet?", ["Mars"], "contains"),
    ("What is the natural satellite of the Earth called?", ["moon"], "contains"),
    ("How many hours are there in a day?", ["24"], "numeric"),
    ("How many minutes are there in an hour?", ["60"], "numeric"),
    ("How many seconds are there in a minute?", ["60"], "numeric"),
    ("How many days are there in a week?", ["7"], "numeric"),
    ("How many months are there in a year?", ["12"], "numeric"),
    ("How many continents are there?", ["7"], "numeric"),
    ("What is the first month of the year?", ["January"], "contains"),
    ("What is the last month of the year?", ["December"], "contains"),
    ("What do you call a shape with three sides?", ["triangle"], "contains"),
    ("What do you call a shape with four equal sides and four right angles?", ["square"], "contains"),
    ("How many sides does a hexagon have?", ["6"], "numeric"),
    ("What is the opposite of north?", ["south"], "contains"),
    ("What do people use to write on a blackboard?", ["chalk"], "contains"),
    ("Which language is mainly spoken in Spain?", ["Spanish"], "contains"),
    ("Which language is mainly spoken in France?", ["French"], "contains"),
    ("Which language is mainly spoken in Germany?", ["German"], "contains"),
    ("What is the tallest mountain in the world?", ["Everest", "Mount Everest"], "contains"),
    ("What is the longest river in Africa?", ["Nile"], "contains"),
    ("What do we call a person who treats sick people?", ["doctor", "physician", "nurse"], "contains"),
]
REPLY_WORDS = ["apple", "river", "green", "seven", "hello", "yes", "no", "blue", "table", "music", "garden",
               "ocean", "pencil", "orange", "tiger", "window", "summer", "bread", "silver", "rocket"]
LETTER_WORDS = ["banana", "cat", "dog", "elephant", "fish", "garden", "house", "island", "jungle", "kite",
                "lemon", "mountain", "night", "orange", "pencil", "queen", "rabbit", "sun", "tree", "umbrella",
                "violin", "water", "yellow", "zebra"]
YES_NO = [
    ("Is a dog an animal?", "yes"), ("Is the sun cold?", "no"), ("Is water wet?", "yes"),
    ("Can fish swim?", "yes"), ("Is ice hot?", "no"), ("Is two bigger than five?", "no"),
    ("Is Paris in France?", "yes"), ("Do cats have wings?", "no"), ("Is the sky green on a clear day?", "no"),
    ("Is a banana a fruit?", "yes"), ("Is seven an even number?", "no"), ("Do birds lay eggs?", "yes"),
]
LAST_WORD_SENTENCES = ["the quick brown fox", "I like green tea", "we walk to school", "birds fly south",
                       "she reads a book", "the cat sleeps"]


def _question(qid: str, category: str, question: str, answers: list[str] | list[int], match: str) -> dict:
    return {"id": qid, "category": category, "question": question, "answers": [str(a) for a in answers],
            "match": match}


def factual() -> list[dict]:
    items = [_question(f"capital-{i:02d}", "factual", f"What is the capital of {country}?", cities, "contains")
             for i, (country, cities) in enumerate(CAPITALS.items())]
    items += [_question(f"colour-{i:02d}", "factual", f"What colour is {thing}?", colours, "contains")
              for i, (thing, colours) in enumerate(COLOURS.items())]
    items += [_question(f"animal-{i:02d}", "factual", q, a, "contains") for i, (q, a) in enumerate(ANIMAL_FACTS)]
    items += [_question(f"legs-{i:02d}", "factual", f"How many legs does {animal} have?", [n], "numeric")
              for i, (animal, n) in enumerate(LEG_COUNTS.items())]
    items += [_question(f"opposite-{i:02d}", "factual", f"What is the opposite of '{word}'?", opposite, "contains")
              for i, (word, opposite) in enumerate(OPPOSITES.items())]
    for i, day in enumerate(DAYS):
        items.append(_question(f"day-after-{i}", "factual", f"What day of the week comes after {day}?",
                               [DAYS[(i + 1) % 7]], "contains"))
        items.append(_question(f"day-before-{i}", "factual", f"What day of the week comes before {day}?",
                               [DAYS[(i - 1) % 7]], "contains"))
    for i, month in enumerate(MONTHS):
        items.append(_question(f"month-after-{i:02d}", "factual", f"Which month comes after {month}?",
                               [MONTHS[(i + 1) % 12]], "contains"))
    items += [_question(f"general-{i:02d}", "factual", q, a, m) for i, (q, a, m) in enumerate(GENERAL)]
    return items


def arithmetic(rng: random.Random) -> list[dict]:
    items = []
    for i in range(40):
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        phrase = rng.choice(["{a} + {b}", "{a} plus {b}"])
        items.append(_question(f"add-{i:02d}", "arithmetic", f"What is {phrase.format(a=a, b=b)}?", [a + b],
                               "numeric"))
    for i in range(30):
        a, b = sorted((rng.randint(1, 20), rng.randint(1, 20)), reverse=True)
        phrase = rng.choice(["{a} - {b}", "{a} minus {b}"])
        items.append(_question(f"sub-{i:02d}", "arithmetic", f"What is {phrase.format(a=a, b=b)}?", [a - b],
                               "numeric"))
    for i in range(30):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        phrase = rng.choice(["{a} * {b}", "{a} times {b}", "{a} multiplied by {b}"])
        items.append(_question(f"mul-{i:02d}", "arithmetic", f"What is {phrase.format(a=a, b=b)}?", [a * b],
                               "numeric"))
    return items


def instructions(rng: random.Random) -> list[dict]:
    items = [_question(f"reply-word-{i:02d}", "instruction", f"Reply with only the word '{w}'.", [w], "exact")
             for i, w in enumerate(REPLY_WORDS)]
    for i in range(20):
        n = rng.randint(3, 999)
        items.append(_question(f"repeat-number-{i:02d}", "instruction",
                               f"Repeat the number {n}. Reply with only the number.", [n], "exact"))
    items += [_question(f"first-letter-{i:02d}", "instruction",
                        f"What is the first letter of the word '{w}'? Reply with only the letter.", [w[0]], "exact")
              for i, w in enumerate(LETTER_WORDS)]
    items += [_question(f"yes-no-{i:02d}", "instruction", f"{q} Answer with only yes or no.", [a], "exact")
              for i, (q, a) in enumerate(YES_NO)]
    items += [_question(f"last-word-{i:02d}", "instruction",
                        f"What is the last word of the sentence '{s}'? Reply with only that word.", [s.split()[-1]],
                        "exact")
              for i, s in enumerate(LAST_WORD_SENTENCES)]
    return items


def questions() -> list[dict]:
    """Every shipped question, in file order (factual, arithmetic, instruction)."""
    rng = random.Random(16)  # issue 16
    return factual() + arithmetic(rng) + instructions(rng)


def render() -> str:
    return "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions())


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {len(questions())} questions to {OUT}", file=sys.stderr)
