# Generic negative probes (subject placeholder X), written a priori from common KB relations.
PROBES_Q = [
    "What is the occupation of X?", "What is X's profession?", "Where was X born?", "When was X born?",
    "Where did X die?", "When did X die?", "What is the nationality of X?", "What language does X speak?",
    "Who is the spouse of X?", "Who is the father of X?", "Who is the mother of X?", "Where did X study?",
    "Who is X's employer?", "What genre is X?", "What is the religion of X?",
    "Which political party does X belong to?", "What instrument does X play?", "What sport does X play?",
    "Which team does X play for?", "In which country is X located?", "What is the capital of X?",
    "Who founded X?", "When was X founded?", "Where is the headquarters of X?", "Who manufactured X?",
    "Who created X?", "What award did X receive?", "What is X named after?", "Who owns X?",
    "What is the population of X?",
]
PROBES_S = [
    "The occupation of X is", "X works as a", "X was born in", "X was born on", "X died in",
    "X passed away on", "X is a citizen of", "X speaks the language", "X is married to",
    "The father of X is", "The mother of X is", "X studied at", "X is employed by", "The genre of X is",
    "The religion of X is", "X is a member of the political party", "X plays the instrument",
    "X plays the sport of", "X plays for the team", "X is located in the country of", "The capital of X is",
    "X was founded by", "X was founded in the year", "The headquarters of X is in", "X is manufactured by",
    "X was created by", "X received the award", "X is named after", "X is owned by",
    "The population of X is",
]

# Tiny hand-written synonym list for positive variants (word/phrase level, both directions where sensible).
SYN = {
    "occupation": "profession", "profession": "occupation", "job": "occupation", "career": "occupation",
    "native language": "mother tongue", "mother tongue": "native language", "language": "tongue",
    "located": "situated", "situated": "located", "created": "made", "made": "created",
    "produced": "manufactured", "manufactured": "produced", "developed": "created", "founded": "established",
    "established": "founded", "died": "passed away", "city": "town", "town": "city", "country": "nation",
    "nation": "country", "is": "was", "was": "is", "plays": "performs", "spouse": "partner",
    "wife": "spouse", "husband": "spouse", "religion": "faith", "faith": "religion", "member": "part",
    "company": "firm", "owned": "held", "owner": "proprietor", "genre": "style", "team": "club",
    "club": "team", "award": "prize", "prize": "award", "university": "college", "college": "university",
    "position": "role", "role": "position", "author": "writer", "writer": "author",
    "headquarters": "head office", "What": "Which", "Which": "What", "born": "birthed",
}

import re as _re

def _syn_variants(p, k=4):
    out = []
    for a, b in SYN.items():
        pat = r'\b' + _re.escape(a) + r'\b'
        if _re.search(pat, p):
            out.append(_re.sub(pat, b, p, count=1))
        if len(out) >= k:
            break
    return out

def positive_variants(p):
    """Generated paraphrase-like variants of a masked prompt p (subject already replaced by X)."""
    v = []
    q = p.rstrip().endswith('?')
    low = p[0].lower() + p[1:] if p[:1] != 'X' else p
    if q:
        v += ["Tell me, " + low, "Do you know " + low, p.replace("What is", "What's") if "What is" in p else p.rstrip('?') + " ?"]
    else:
        v += ["Tell me: " + p, "Complete the sentence: " + p, p.rstrip() + " what?"]
    # possessive <-> "the Y of X"
    m = _re.search(r'\b[Tt]he ([\w\- ]{1,30}?) of X\b', p)
    if m:
        v.append(p.replace(m.group(0), "X's " + m.group(1)))
    m = _re.search(r"X's ([\w\-]+(?: [\w\-]+)?)", p)
    if m:
        v.append(p.replace(m.group(0), "the " + m.group(1) + " of X"))
    v += _syn_variants(p)
    v = [x for x in dict.fromkeys(v) if x != p]
    return v[:8]
