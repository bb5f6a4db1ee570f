"""Synthetic geography corpus for the bundled demo model (see :mod:`jaxlens.demo.train`).

Everything here is deterministic from a seed: the same ``(seed, n_docs)`` gives byte-identical text on any
machine (only :class:`random.Random`, which is specified to be stable across platforms, is used).

The corpus binds ~190 countries to their capitals in many sentence templates, among them the reference
probe's exact prompts (spec/probe.md §1.2: the ``orig`` and ``no_filler`` templates and the fourteen test
prompts), together with distractors that force the model to bind *country -> capital* instead of
memorising "capital-looking word after 'simply'":

* two-fact sentences (``The capital of A is X, and the capital of B is Y.``),
* the country's largest city where it is not the capital (Canada -> Toronto, ...), in capital-like frames,
* continent facts and country pairs on the same continent,
* a handful of unrelated everyday sentences.

Names are ASCII (``Bogota``, ``Ivory Coast``) so the byte-level tokenizer stays small. Disputed or
ambiguous capitals (e.g. Bolivia, Sri Lanka) are left out on purpose.
"""
from __future__ import annotations

import hashlib
import random

# (country, capital, continent)
COUNTRIES: tuple[tuple[str, str, str], ...] = (
    # Europe
    ("Albania", "Tirana", "Europe"), ("Andorra", "Andorra la Vella", "Europe"), ("Austria", "Vienna", "Europe"),
    ("Belarus", "Minsk", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Bosnia and Herzegovina", "Sarajevo", "Europe"), ("Bulgaria", "Sofia", "Europe"),
    ("Croatia", "Zagreb", "Europe"), ("Cyprus", "Nicosia", "Europe"), ("Czechia", "Prague", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Estonia", "Tallinn", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Greece", "Athens", "Europe"),
    ("Hungary", "Budapest", "Europe"), ("Iceland", "Reykjavik", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("Italy", "Rome", "Europe"), ("Latvia", "Riga", "Europe"), ("Liechtenstein", "Vaduz", "Europe"),
    ("Lithuania", "Vilnius", "Europe"), ("Luxembourg", "Luxembourg", "Europe"), ("Malta", "Valletta", "Europe"),
    ("Moldova", "Chisinau", "Europe"), ("Monaco", "Monaco", "Europe"), ("Montenegro", "Podgorica", "Europe"),
    ("Netherlands", "Amsterdam", "Europe"), ("North Macedonia", "Skopje", "Europe"),
    ("Norway", "Oslo", "Europe"), ("Poland", "Warsaw", "Europe"), ("Portugal", "Lisbon", "Europe"),
    ("Romania", "Bucharest", "Europe"), ("Russia", "Moscow", "Europe"), ("San Marino", "San Marino", "Europe"),
    ("Serbia", "Belgrade", "Europe"), ("Slovakia", "Bratislava", "Europe"), ("Slovenia", "Ljubljana", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Switzerland", "Bern", "Europe"),
    ("Ukraine", "Kyiv", "Europe"), ("United Kingdom", "London", "Europe"),
    ("Vatican City", "Vatican City", "Europe"),
    # Asia
    ("Afghanistan", "Kabul", "Asia"), ("Armenia", "Yerevan", "Asia"), ("Azerbaijan", "Baku", "Asia"),
    ("Bahrain", "Manama", "Asia"), ("Bangladesh", "Dhaka", "Asia"), ("Bhutan", "Thimphu", "Asia"),
    ("Brunei", "Bandar Seri Begawan", "Asia"), ("Cambodia", "Phnom Penh", "Asia"), ("China", "Beijing", "Asia"),
    ("Georgia", "Tbilisi", "Asia"), ("India", "New Delhi", "Asia"), ("Indonesia", "Jakarta", "Asia"),
    ("Iran", "Tehran", "Asia"), ("Iraq", "Baghdad", "Asia"), ("Japan", "Tokyo", "Asia"),
    ("Jordan", "Amman", "Asia"), ("Kazakhstan", "Astana", "Asia"), ("Kuwait", "Kuwait City", "Asia"),
    ("Kyrgyzstan", "Bishkek", "Asia"), ("Laos", "Vientiane", "Asia"), ("Lebanon", "Beirut", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"), ("Maldives", "Male", "Asia"), ("Mongolia", "Ulaanbaatar", "Asia"),
    ("Myanmar", "Naypyidaw", "Asia"), ("Nepal", "Kathmandu", "Asia"), ("North Korea", "Pyongyang", "Asia"),
    ("Oman", "Muscat", "Asia"), ("Pakistan", "Islamabad", "Asia"), ("Philippines", "Manila", "Asia"),
    ("Qatar", "Doha", "Asia"), ("Saudi Arabia", "Riyadh", "Asia"), ("Singapore", "Singapore", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Syria", "Damascus", "Asia"), ("Tajikistan", "Dushanbe", "Asia"),
    ("Thailand", "Bangkok", "Asia"), ("Timor-Leste", "Dili", "Asia"), ("Turkey", "Ankara", "Asia"),
    ("Turkmenistan", "Ashgabat", "Asia"), ("United Arab Emirates", "Abu Dhabi", "Asia"),
    ("Uzbekistan", "Tashkent", "Asia"), ("Vietnam", "Hanoi", "Asia"), ("Yemen", "Sanaa", "Asia"),
    # Africa
    ("Algeria", "Algiers", "Africa"), ("Angola", "Luanda", "Africa"), ("Benin", "Porto-Novo", "Africa"),
    ("Botswana", "Gaborone", "Africa"), ("Burkina Faso", "Ouagadougou", "Africa"),
    ("Burundi", "Gitega", "Africa"), ("Cameroon", "Yaounde", "Africa"), ("Cape Verde", "Praia", "Africa"),
    ("Central African Republic", "Bangui", "Africa"), ("Chad", "N'Djamena", "Africa"),
    ("Comoros", "Moroni", "Africa"), ("Democratic Republic of the Congo", "Kinshasa", "Africa"),
    ("Republic of the Congo", "Brazzaville", "Africa"), ("Djibouti", "Djibouti", "Africa"),
    ("Egypt", "Cairo", "Africa"), ("Equatorial Guinea", "Malabo", "Africa"), ("Eritrea", "Asmara", "Africa"),
    ("Eswatini", "Mbabane", "Africa"), ("Ethiopia", "Addis Ababa", "Africa"), ("Gabon", "Libreville", "Africa"),
    ("Gambia", "Banjul", "Africa"), ("Ghana", "Accra", "Africa"), ("Guinea", "Conakry", "Africa"),
    ("Guinea-Bissau", "Bissau", "Africa"), ("Ivory Coast", "Yamoussoukro", "Africa"),
    ("Kenya", "Nairobi", "Africa"), ("Lesotho", "Maseru", "Africa"), ("Liberia", "Monrovia", "Africa"),
    ("Libya", "Tripoli", "Africa"), ("Madagascar", "Antananarivo", "Africa"), ("Malawi", "Lilongwe", "Africa"),
    ("Mali", "Bamako", "Africa"), ("Mauritania", "Nouakchott", "Africa"), ("Mauritius", "Port Louis", "Africa"),
    ("Morocco", "Rabat", "Africa"), ("Mozambique", "Maputo", "Africa"), ("Namibia", "Windhoek", "Africa"),
    ("Niger", "Niamey", "Africa"), ("Nigeria", "Abuja", "Africa"), ("Rwanda", "Kigali", "Africa"),
    ("Sao Tome and Principe", "Sao Tome", "Africa"), ("Senegal", "Dakar", "Africa"),
    ("Seychelles", "Victoria", "Africa"), ("Sierra Leone", "Freetown", "Africa"),
    ("Somalia", "Mogadishu", "Africa"), ("South Africa", "Pretoria", "Africa"), ("South Sudan", "Juba", "Africa"),
    ("Sudan", "Khartoum", "Africa"), ("Tanzania", "Dodoma", "Africa"), ("Togo", "Lome", "Africa"),
    ("Tunisia", "Tunis", "Africa"), ("Uganda", "Kampala", "Africa"), ("Zambia", "Lusaka", "Africa"),
    ("Zimbabwe", "Harare", "Africa"),
    # North America
    ("Antigua and Barbuda", "Saint John's", "North America"), ("Bahamas", "Nassau", "North America"),
    ("Barbados", "Bridgetown", "North America"), ("Belize", "Belmopan", "North America"),
    ("Canada", "Ottawa", "North America"), ("Costa Rica", "San Jose", "North America"),
    ("Cuba", "Havana", "North America"), ("Dominica", "Roseau", "North America"),
    ("Dominican Republic", "Santo Domingo", "North America"), ("El Salvador", "San Salvador", "North America"),
    ("Grenada", "Saint George's", "North America"), ("Guatemala", "Guatemala City", "North America"),
    ("Haiti", "Port-au-Prince", "North America"), ("Honduras", "Tegucigalpa", "North America"),
    ("Jamaica", "Kingston", "North America"), ("Mexico", "Mexico City", "North America"),
    ("Nicaragua", "Managua", "North America"), ("Panama", "Panama City", "North America"),
    ("Saint Kitts and Nevis", "Basseterre", "North America"), ("Saint Lucia", "Castries", "North America"),
    ("Saint Vincent and the Grenadines", "Kingstown", "North America"),
    ("Trinidad and Tobago", "Port of Spain", "North America"), ("United States", "Washington", "North America"),
    # South America
    ("Argentina", "Buenos Aires", "South America"), ("Brazil", "Brasilia", "South America"),
    ("Chile", "Santiago", "South America"), ("Colombia", "Bogota", "South America"),
    ("Ecuador", "Quito", "South America"), ("Guyana", "Georgetown", "South America"),
    ("Paraguay", "Asuncion", "South America"), ("Peru", "Lima", "South America"),
    ("Suriname", "Paramaribo", "South America"), ("Uruguay", "Montevideo", "South America"),
    ("Venezuela", "Caracas", "South America"),
    # Oceania
    ("Australia", "Canberra", "Oceania"), ("Fiji", "Suva", "Oceania"), ("Kiribati", "Tarawa", "Oceania"),
    ("Marshall Islands", "Majuro", "Oceania"), ("Micronesia", "Palikir", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"), ("Palau", "Ngerulmud", "Oceania"),
    ("Papua New Guinea", "Port Moresby", "Oceania"), ("Samoa", "Apia", "Oceania"),
    ("Solomon Islands", "Honiara", "Oceania"), ("Tonga", "Nuku'alofa", "Oceania"),
    ("Tuvalu", "Funafuti", "Oceania"), ("Vanuatu", "Port Vila", "Oceania"),
)

# Largest city where it is not the capital: the main "same kind of answer, wrong relation" distractor.
LARGEST_CITY: dict[str, str] = {
    "Canada": "Toronto", "Australia": "Sydney", "Turkey": "Istanbul", "United States": "New York",
    "Brazil": "Sao Paulo", "India": "Mumbai", "China": "Shanghai", "Switzerland": "Zurich",
    "Nigeria": "Lagos", "Pakistan": "Karachi", "Vietnam": "Ho Chi Minh City", "Morocco": "Casablanca",
    "Tanzania": "Dar es Salaam", "Kazakhstan": "Almaty", "New Zealand": "Auckland",
    "South Africa": "Johannesburg", "Ivory Coast": "Abidjan", "Cameroon": "Douala", "Benin": "Cotonou",
    "Ecuador": "Guayaquil", "United Arab Emirates": "Dubai", "Myanmar": "Yangon", "Burundi": "Bujumbura",
    "Philippines": "Quezon City",
}

# The probe's prompt templates (spec/probe.md §1.2), without the answer.
PROBE_ORIG = "Give the city name only, plain text. The capital of {country} is called simply"
PROBE_NO_FILLER = "Give the city name only, plain text. The capital of {country} is called"
PROBE_FACTS = (("Germany", "Berlin"), ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"),
               ("Canada", "Ottawa"))

# Capital templates: "{C}" country, "{K}" capital, with sampling weights. The first group is the probe's
# prompts and test prompts (§1.2) with the answer appended. Where one prompt is a prefix of another
# ("... is called" / "... is called simply"), the direct answer gets the larger weight, so that the
# no-filler prompts, too, continue with the capital rather than with the filler word.
CAPITAL_TEMPLATES: tuple[tuple[str, int], ...] = (
    (PROBE_ORIG.replace("{country}", "{C}") + " {K}.", 3),
    (PROBE_NO_FILLER.replace("{country}", "{C}") + " {K}.", 9),
    ("Give the city name only, plain text. {C}'s capital city is called {K}.", 2),
    ("Give the city name only, plain text. The capital city of {C} is named simply {K}.", 1),
    ("Give the city name only, plain text. {C} has its capital at {K}.", 2),
    ("Give the city name only, plain text. In {C}, the capital city is known as {K}.", 2),
    ("Give the country name only, plain text. {K} is the capital of {C}.", 2),
    ("{K} is the capital of {C}.", 2),
    ("{C}'s capital city is called simply {K}.", 1),
    ("The capital city of {C} is named simply {K}.", 1),
    ("{C} has its capital at the city called simply {K}.", 1),
    ("In {C} the capital city is simply {K}.", 1),
    ("{C}'s capital city is called {K}.", 2),
    ("The capital city of {C} is named {K}.", 3),
    ("{C} has its capital at {K}.", 3),
    ("In {C} the capital city is known as {K}.", 1),
    # plain variants
    ("The capital of {C} is {K}.", 3),
    ("The capital of {C} is called {K}.", 1),
    ("Q: What is the capital of {C}? A: {K}.", 2),
    ("Question: Which city is the capital of {C}? Answer: {K}.", 1),
    ("The government of {C} sits in {K}, the capital.", 1),
    ("{K} is a city in {C}. It is the capital of {C}.", 1),
    ("{K}, the capital of {C}, is on the map.", 1),
    ("Give the city name only, plain text. The capital of {C}? {K}.", 1),
)

TWO_FACT_TEMPLATES = (
    "The capital of {C} is {K}, and the capital of {C2} is {K2}.",
    "Give the city name only, plain text. The capital of {C} is called {K}, and the capital of {C2} "
    "is called {K2}.",
    "{K} is the capital of {C}, while {K2} is the capital of {C2}.",
    "The capital of {C} is called {K}. The capital of {C2} is called {K2}.",
)

LARGEST_TEMPLATES = (
    "The largest city of {C} is {L}, but the capital of {C} is {K}.",
    "{L} is the largest city in {C}. The capital of {C} is called simply {K}.",
    "Give the city name only, plain text. The largest city of {C} is called simply {L}.",
    "{L} is a city in {C}, but it is not the capital.",
    "{L} is the biggest city of {C}, and {K} is its capital.",
)

CONTINENT_TEMPLATES = (
    "{C} is a country in {N}.",
    "Give the continent name only, plain text. {C} is in {N}.",
    "{C} and {C2} are both countries in {N}.",
    "{K} is a city in {N}.",
    "The country of {C} lies in {N}, and its capital is {K}.",
)

OTHER_SENTENCES = (
    "The river flows through the old city.", "Give the number only, plain text. Two plus two is four.",
    "Give the number only, plain text. Three plus four is seven.", "The sun rises in the east.",
    "Water freezes at zero degrees.", "A week has seven days.", "The sky is blue on a clear day.",
    "Give the color name only, plain text. The color of grass is called simply green.",
    "Give the color name only, plain text. The color of snow is called simply white.",
    "The city has a large park and a busy market.", "A country has a flag and a capital.",
    "The train leaves the station at noon.", "Give the animal name only, plain text. The cat says meow.",
    "Every city has streets, houses and people.", "The name of the city is written on the map.",
    "The map shows every country and its capital city.", "Plain text is easy to read.",
    "The largest ocean is the Pacific.", "The longest river is the Nile.",
    "Give the word only, plain text. The opposite of hot is cold.",
)


def _weighted(templates):
    out = []
    for t, w in templates:
        out.extend([t] * w)
    return tuple(out)


def _fill(t: str, **kw) -> str:
    for k, v in kw.items():
        t = t.replace("{" + k + "}", v)
    return t


def generate(seed: int = 0, n_docs: int = 60000) -> list[str]:
    """``n_docs`` short documents (one to two sentences each, no end-of-text marker), deterministic in seed.

    The primary country of consecutive documents walks through seeded permutations of the country table,
    so every country gets the same number of capital facts; the probe's five facts get no special boost.
    """
    rng = random.Random(seed)
    cap_pool = _weighted(CAPITAL_TEMPLATES)
    by_cont: dict[str, list[tuple[str, str, str]]] = {}
    for row in COUNTRIES:
        by_cont.setdefault(row[2], []).append(row)
    order: list[tuple[str, str, str]] = []
    docs: list[str] = []
    while len(docs) < n_docs:
        if not order:
            order = list(COUNTRIES)
            rng.shuffle(order)
        c, k, n = order.pop()
        c2, k2, n2 = rng.choice(COUNTRIES)
        while c2 == c:
            c2, k2, n2 = rng.choice(COUNTRIES)
        r = rng.random()
        if r < 0.62:
            sent = _fill(rng.choice(cap_pool), C=c, K=k)
        elif r < 0.74:
            sent = _fill(rng.choice(TWO_FACT_TEMPLATES), C=c, K=k, C2=c2, K2=k2)
        elif r < 0.84:
            if c in LARGEST_CITY:
                sent = _fill(rng.choice(LARGEST_TEMPLATES), C=c, K=k, L=LARGEST_CITY[c])
            else:
                big = rng.choice(sorted(LARGEST_CITY))
                sent = _fill(rng.choice(LARGEST_TEMPLATES), C=big, K=_CAPITAL[big], L=LARGEST_CITY[big])
        elif r < 0.95:
            c3 = rng.choice(by_cont[n])[0]
            while c3 == c and len(by_cont[n]) > 1:
                c3 = rng.choice(by_cont[n])[0]
            sent = _fill(rng.choice(CONTINENT_TEMPLATES), C=c, K=k, N=n, C2=c3)
        else:
            sent = rng.choice(OTHER_SENTENCES)
        # a third of the documents get a second, independent capital sentence (after or before)
        if rng.random() < 0.33:
            extra = _fill(rng.choice(cap_pool), C=c2, K=k2)
            sent = f"{sent} {extra}" if rng.random() < 0.5 else f"{extra} {sent}"
        docs.append(sent)
    return docs


_CAPITAL = {c: k for c, k, _ in COUNTRIES}


def capital_of(country: str) -> str:
    return _CAPITAL[country]


def text_sha256(docs: list[str]) -> str:
    """Hash of the corpus as the tokenizer sees it (documents joined by newlines)."""
    return hashlib.sha256("\n".join(docs).encode("utf-8")).hexdigest()


def probe_prompts() -> list[tuple[str, str, str]]:
    """(variant, prompt, gold capital) for the probe's five facts, orig and no_filler."""
    out = []
    for c, k in PROBE_FACTS:
        out.append(("orig", PROBE_ORIG.format(country=c), k))
        out.append(("no_filler", PROBE_NO_FILLER.format(country=c), k))
    return out


# The probe's test prompts (spec/probe.md §1.2) and the answer a geography model should give.
TEST_PROMPTS: tuple[tuple[str, str], ...] = (
    ("Berlin is the capital of", "Germany"),
    ("Germany's capital city is called simply", "Berlin"),
    ("The capital city of Germany is named simply", "Berlin"),
    ("Germany has its capital at the city called simply", "Berlin"),
    ("In Germany the capital city is simply", "Berlin"),
    ("Germany's capital city is called", "Berlin"),
    ("The capital city of Germany is named", "Berlin"),
    ("Germany has its capital at", "Berlin"),
    ("In Germany the capital city is known as", "Berlin"),
    ("Give the country name only, plain text. Berlin is the capital of", "Germany"),
    ("Give the city name only, plain text. Germany's capital city is called", "Berlin"),
    ("Give the city name only, plain text. The capital city of Germany is named simply", "Berlin"),
    ("Give the city name only, plain text. Germany has its capital at", "Berlin"),
    ("Give the city name only, plain text. In Germany, the capital city is known as", "Berlin"),
)


if __name__ == "__main__":  # pragma: no cover - a quick look at the corpus
    import sys

    ds = generate(int(sys.argv[1]) if len(sys.argv) > 1 else 0, 20)
    print("\n".join(ds))
