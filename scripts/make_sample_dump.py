#!/usr/bin/env python3
"""Build the sample dump shipped with pitchkeras: invented reviews in the Kaggle Pitchfork schema.

The file `pitchkeras/sample_data/pitchfork_sample.sqlite` lets `pitchkeras demo`
and the tests run the whole job offline. It has the six tables of the public
Kaggle dump (`reviews`, `artists`, `genres`, `labels`, `years`, `content`, all
keyed by `reviewid`) and about 300 short reviews across the seed's eight genres
and the whole 0.0-10.0 score range.

Every text is composed here, from phrase banks written for this project, by a
seeded composer: invented artists, albums, tracks, labels and critics;
genre-specific vocabulary (instruments, production, moods, vocals); and a
tone that follows the score, so that a 2.1 reads as a pan and a 9.3 as a
rave. No sentence is copied from a real review.

Like the Kaggle dump, `reviews.title`, `reviews.artist`, `artists.artist` and
`genres.genre` are lower case, a handful of reviews carry two genres and a
handful have a NULL genre; `content.content` is the review with its own casing.

The output is deterministic: the only source of randomness is
`random.Random(seed).random()`, whose sequence Python guarantees across
versions (the other helpers of `random` are not guaranteed, so the draws are
done here). Tables are compared, not file bytes, since SQLite's page layout
may differ between library versions.

Usage:

    python scripts/make_sample_dump.py                  # rewrite the packaged file
    python scripts/make_sample_dump.py --output /tmp/x.sqlite --report
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import re
import sqlite3
import sys
import tempfile
import unicodedata
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "pitchkeras" / "sample_data" / "pitchfork_sample.sqlite"
DEFAULT_SEED = 20240607  # any fixed int; changing it changes every review
DEFAULT_NUM_REVIEWS = 300
MIN_WORDS, MAX_WORDS = 60, 150  # per review, as the brief asks
NUM_TWO_GENRE, NUM_NO_GENRE = 12, 6  # a handful of each, as in the real dump

# The seed project's eight genres, spelled as the Kaggle dump spells them.
GENRES = ("rock", "electronic", "rap", "pop/r&b", "experimental", "folk/country", "metal", "jazz")

SCHEMA = (
    """CREATE TABLE reviews (
    reviewid INTEGER, title TEXT, artist TEXT, url TEXT, score REAL, best_new_music INTEGER,
    author TEXT, author_type TEXT, pub_date TEXT, pub_weekday INTEGER, pub_day INTEGER,
    pub_month INTEGER, pub_year INTEGER)""",
    "CREATE TABLE artists (reviewid INTEGER, artist TEXT)",
    "CREATE TABLE genres (reviewid INTEGER, genre TEXT)",
    "CREATE TABLE labels (reviewid INTEGER, label TEXT)",
    "CREATE TABLE years (reviewid INTEGER, year INTEGER)",
    "CREATE TABLE content (reviewid INTEGER, content TEXT)",
)
TABLES = ("reviews", "artists", "genres", "labels", "years", "content")


# -- randomness ------------------------------------------------------------------
class Draw:
    """Seeded draws built on `random.Random.random()` alone, whose sequence is stable across Pythons.

    Args:
        seed: int. The seed.
    """

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def unit(self) -> float:
        return self._rng.random()

    def below(self, n: int) -> int:
        return min(int(self.unit() * n), n - 1)

    def choice(self, items):
        return items[self.below(len(items))]

    def chance(self, p: float) -> bool:
        return self.unit() < p

    def sample(self, items, k: int) -> list:
        pool = list(items)
        return [pool.pop(self.below(len(pool))) for _ in range(min(k, len(pool)))]

    def shuffle(self, items) -> list:
        return self.sample(items, len(items))

    def gauss(self, mu: float, sigma: float) -> float:
        # Box-Muller; 1 - u keeps log() away from zero.
        u1, u2 = 1.0 - self.unit(), self.unit()
        return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


# -- invented names ----------------------------------------------------------------
BAND_ADJ = ("Velvet", "Paper", "Hollow", "Glass", "Quiet", "Burning", "Neon", "Salt", "Lunar", "Copper",
            "Sunken", "Amber", "Hidden", "Northern", "Crooked", "Pale", "Electric", "Tender", "Feral", "Rusted")
BAND_NOUN = ("Orchards", "Harbors", "Lanterns", "Satellites", "Pines", "Ferries", "Mirrors", "Comets",
             "Saints", "Gardens", "Foxes", "Radios", "Kites", "Ghosts", "Engines", "Valleys", "Choirs", "Motels")
FIRST = ("Sigrún", "Zoë", "Anaïs", "José", "Björn", "Émilie", "Maya", "Theo", "Dara", "Kofi", "Lena", "Inès",
         "Marcus", "Noor", "Tomás", "Yuki", "Ruth", "Felix", "Oona", "Dev", "Colette", "Ravi", "Greta", "Malik",
         "Søren", "Ada", "Joaquín", "Hattie", "Wren", "Nikolai")
LAST = ("Hallsdóttir", "Marchetti", "Okafor", "Lindqvist", "Brennan", "Ferreira", "Nakamura", "Castellanos",
        "Duval", "Weir", "Abernathy", "Solberg", "Quiñones", "Adeyemi", "Varga", "Holloway", "Kowalczyk",
        "Mbeki-Ross", "Ocampo", "Thorne", "Delacroix", "Pemberton", "Åberg", "Sato")
ALIAS_HEAD = ("Vel", "Lu", "Mor", "Kae", "Tor", "Sil", "Ny", "Ra", "Zel", "Ori", "Fen", "Aru", "Quill", "Dho")
ALIAS_TAIL = ("ssa", "mond", "vik", "ria", "tal", "dex", "nu", "lith", "oro", "wyn", "kasi", "ette")
RAP_HANDLE = ("Saint Copper", "Lil Comet", "Young Ledger", "Marrow Kid", "Doc Halo", "Quarter Moon",
              "Big Static", "Nyla Cash", "Kid Ferris", "Tre Meridian", "Jovi Blocks", "Mama Voltage",
              "Rico Lantern", "Prophet Vane", "Slim Avenue", "Dre Solace")
ACCENTED_BANDS = ("Café Lumbre", "Los Espejos Rotos", "Niño Cobalto", "Fjärilsdal", "Les Éclairs Doux",
                  "São Marítimo", "Mañana Eléctrica", "Örvar & the Tides", "Zoë and the Undertow",
                  "Sigrún Sól")
ALBUM_ADJ = ("Quiet", "Golden", "Broken", "Endless", "Second", "Soft", "Hard", "Blue", "Small", "Bright",
             "Distant", "Heavy", "Lonely", "Wild", "Slow", "Open", "Borrowed", "Painted", "Late", "Low")
ALBUM_NOUN = ("Hours", "Weather", "Rooms", "Signals", "Fires", "Rivers", "Windows", "Summers", "Machines",
              "Houses", "Letters", "Islands", "Ceremonies", "Mornings", "Debts", "Frequencies", "Harvest",
              "Static", "Thunder", "Glow", "Ballads", "Ruins", "Satellites", "Tides", "Gestures")
ALBUM_WORD = ("Halflight", "Undertow", "Meridian", "Afterglow", "Tributaries", "Palimpsest", "Vesper",
              "Lowlands", "Clearing", "Ember", "Parallax", "Solstice", "Driftwood", "Kintsugi", "Threshold",
              "Marrowland", "Nocturne", "Ferrous", "Saltwater", "Overpass", "Dovetail", "Quarry", "Fathom")
TRACK_A = ("Salt", "Paper", "Night", "Glass", "River", "Ghost", "Summer", "Iron", "Silver", "Blue", "Slow",
           "Wild", "Hollow", "Tin", "Velvet", "Cold", "Open", "Little", "Last", "Burning")
TRACK_B = ("Hour", "Song", "Door", "Light", "Road", "Heart", "Engine", "Kingdom", "Letter", "Party", "Season",
           "Canyon", "Mirror", "Prayer", "Static", "Garden", "Hymn", "Avenue", "Machine", "Fever")
LABEL_A = ("Driftwood", "Halcyon", "Lantern", "Copperline", "Northbound", "Basement", "Velour", "Saltmarsh",
           "Orbit", "Kestrel", "Tidewater", "Greyhound", "Marigold", "Foxglove", "Static")
LABEL_B = ("Records", "Tapes", "Recordings", "Sound", "Music", "Editions", "Disques", "Audio")
AUTHOR_TYPES = ("contributor", "contributor", "contributor", "senior staff writer", "associate editor",
                "contributing editor", "senior editor", "executive editor", None)


def band_name(draw: Draw, genre: str) -> tuple[str, bool]:
    """An invented artist for `genre`, and whether its name takes a plural verb ("The Pale Foxes have")."""
    roll = draw.unit()
    if genre == "rap" and roll < 0.75:
        return draw.choice(RAP_HANDLE), False
    if genre in ("electronic", "experimental") and roll < 0.45:
        return draw.choice(ALIAS_HEAD) + draw.choice(ALIAS_TAIL), False
    if roll < 0.12:
        return draw.choice(ACCENTED_BANDS), False
    if roll < 0.5:
        return f"{draw.choice(FIRST)} {draw.choice(LAST)}", False
    if roll < 0.8:
        return f"The {draw.choice(BAND_ADJ)} {draw.choice(BAND_NOUN)}", True
    return f"{draw.choice(BAND_ADJ)} {draw.choice(BAND_NOUN)}", True


def album_name(draw: Draw) -> str:
    roll = draw.unit()
    if roll < 0.3:
        return draw.choice(ALBUM_WORD)
    if roll < 0.6:
        return f"{draw.choice(ALBUM_ADJ)} {draw.choice(ALBUM_NOUN)}"
    if roll < 0.75:
        return f"{draw.choice(ALBUM_NOUN)} in the {draw.choice(TRACK_B)}"
    if roll < 0.88:
        return f"The {draw.choice(TRACK_B)} Tapes"
    return f"{draw.choice(ALBUM_WORD)} {draw.choice(('II', 'Suite', 'Sessions', 'EP'))}"


def track_names(draw: Draw, n: int) -> list[str]:
    names = []
    while len(names) < n:
        name = f"{draw.choice(TRACK_A)} {draw.choice(TRACK_B)}" if draw.chance(0.7) else draw.choice(ALBUM_WORD)
        if name not in names:
            names.append(name)
    return names


def slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


# -- genre vocabulary ----------------------------------------------------------------
# Per genre: what is played, how it is produced, how it feels, who sings, what the
# songs are called, and which scene it answers to.
VOCAB = {
    "rock": dict(
        short=("rock", "guitar rock", "indie rock"),
        noun=("rock record", "guitar album", "band record"),
        instruments=("jangling guitars", "a fuzzed-out bass", "crashing cymbals", "a tight snare",
                     "twin guitar leads", "a battered Farfisa organ", "feedback-soaked riffs", "a driving kick drum"),
        production=("a live-in-the-room mix", "tape hiss", "overdriven amps", "stacked harmonies",
                    "a dry, close-miked drum sound", "garage-grade fuzz", "big, arena-sized reverb"),
        moods=("restless", "scrappy", "anthemic", "wiry", "sun-bleached", "bruised", "urgent", "loose-limbed"),
        vocals=("the singer's hoarse yelp", "gang-vocal choruses", "a half-spoken drawl", "shouted hooks"),
        songs=("songs", "tracks", "cuts", "anthems"),
        scene=("the basement-show circuit", "college radio", "a crowded van and a cheap practice space",
               "two decades of indie guitar music"),
        moves=("builds from a mumble to a roar", "rides one riff until it glows", "slams into a double-time coda",
               "drops out to a lone guitar before the chorus hits"),
    ),
    "electronic": dict(
        short=("techno", "club music", "electronica"),
        noun=("dance record", "electronic album", "club record"),
        instruments=("analog synths", "a rubbery 303 line", "crisp hi-hats", "a four-on-the-floor kick",
                     "chopped vocal samples", "detuned pads", "modular bleeps", "a sub-bass that rattles the floor"),
        production=("sidechained pads", "glassy arpeggios", "long, patient filter sweeps", "granular textures",
                    "a spotless low end", "tape-warped loops", "dubby delays"),
        moods=("hypnotic", "euphoric", "nocturnal", "chilly", "weightless", "propulsive", "glittering", "hazy"),
        vocals=("a pitched-down vocal hook", "diva samples cut into syllables", "a whispered guest vocal",
                "wordless vocal chops"),
        songs=("tracks", "cuts", "productions", "club tools"),
        scene=("the warehouse circuit", "late-night radio mixes", "a decade of DJ sets",
               "the afterhours crowd"),
        moves=("waits four minutes to drop the kick", "lets a single arpeggio mutate for eight minutes",
               "breaks down to bare hi-hats before the bass returns", "folds a breakbeat under the pads"),
    ),
    "rap": dict(
        short=("rap", "hip-hop", "street rap"),
        noun=("rap album", "mixtape", "hip-hop record"),
        instruments=("chipmunked soul samples", "booming 808s", "skittering hi-hats", "a dusty boom-bap loop",
                     "a menacing piano sample", "a warped organ loop", "rattling snares", "a chopped jazz horn"),
        production=("murky, lo-fi beats", "glossy trap production", "sample-heavy beats", "minimal, drumless loops",
                    "a heavy low end", "cavernous reverb on the drums"),
        moods=("menacing", "wry", "triumphant", "paranoid", "boastful", "reflective", "woozy", "defiant"),
        vocals=("a nimble, elastic flow", "punchlines delivered deadpan", "sing-song hooks",
                "dense, internally rhymed verses", "a gravel-voiced delivery"),
        songs=("songs", "tracks", "verses", "cuts"),
        scene=("the local mixtape circuit", "a block of corner stores and group chats", "the regional scene",
               "years of freestyles and features"),
        moves=("switches flows halfway through the second verse", "lets the beat drop out for the last bars",
               "trades verses with a hungry guest", "flips the sample into something brighter"),
    ),
    "pop/r&b": dict(
        short=("pop", "R&B", "pop-soul"),
        noun=("pop record", "R&B album", "pop album"),
        instruments=("glossy synths", "finger-snap percussion", "a slinky bassline", "warm Rhodes chords",
                     "stacked backing vocals", "a disco string section", "crisp programmed drums", "a plucked guitar"),
        production=("radio-ready polish", "airy, minimalist arrangements", "layered harmonies",
                    "a sleek, expensive mix", "quiet-storm atmospherics", "bright, compressed choruses"),
        moods=("sultry", "giddy", "heartsick", "glossy", "intimate", "breezy", "yearning", "playful"),
        vocals=("a feathery falsetto", "a voice that cracks at the right moments", "layered ad-libs",
                "a big, gospel-trained belt", "conversational, close-miked vocals"),
        songs=("songs", "singles", "ballads", "tracks"),
        scene=("streaming playlists", "late-night radio", "the charts", "a generation raised on 90s R&B"),
        moves=("saves its biggest key change for the last chorus", "strips down to voice and piano in the bridge",
               "turns a breakup into a dance break", "stacks the chorus until it shimmers"),
    ),
    "experimental": dict(
        short=("sound art", "drone", "noise"),
        noun=("experimental record", "sound collage", "avant-garde album"),
        instruments=("prepared piano", "field recordings", "bowed cymbals", "tape loops", "a shortwave radio",
                     "drones from a harmonium", "contact microphones", "detuned strings"),
        production=("long stretches of near-silence", "abrupt edits", "dense layers of noise",
                    "slowly decaying loops", "microtonal tunings", "a cavernous, room-tone mix"),
        moods=("unsettling", "meditative", "abrasive", "dreamlike", "austere", "mysterious", "patient", "uncanny"),
        vocals=("murmured spoken word", "wordless keening", "a voice buried under static",
                "chanted fragments"),
        songs=("pieces", "compositions", "movements", "tracks"),
        scene=("gallery installations", "the tape-label underground", "the sound-art world",
               "a lineage of minimalist composers"),
        moves=("dissolves into pure hiss for its final minutes", "repeats one phrase until it turns strange",
               "cuts from a roar to a single sine tone", "lets a field recording carry the melody"),
    ),
    "folk/country": dict(
        short=("folk", "country", "Americana"),
        noun=("folk record", "country album", "songwriter's record"),
        instruments=("fingerpicked acoustic guitar", "pedal steel", "a lonesome fiddle", "banjo rolls",
                     "brushed drums", "an upright bass", "a wheezing harmonica", "a church piano"),
        production=("a warm, front-porch recording", "sparse arrangements", "close harmonies",
                    "a room you can hear creak", "tasteful Nashville polish", "one-take vocals"),
        moods=("wistful", "plainspoken", "weary", "tender", "homespun", "mournful", "sunlit", "wry"),
        vocals=("a plainspoken alto", "a cracked, weathered tenor", "sibling harmonies",
                "a drawl that lands every line"),
        songs=("songs", "ballads", "tunes", "story-songs"),
        scene=("small-town bars", "the Americana circuit", "kitchen-table songwriting",
               "a long line of troubadours"),
        moves=("adds the pedal steel only for the last verse", "ends on an unresolved chord",
               "turns a family story into a chorus", "slows to a near-whisper before the final line"),
    ),
    "metal": dict(
        short=("metal", "doom", "sludge"),
        noun=("metal album", "doom record", "heavy record"),
        instruments=("down-tuned guitars", "blast beats", "a galloping double kick", "a chugging bass",
                     "tremolo-picked riffs", "a churning rhythm section", "shrieking lead guitar", "a tolling bell"),
        production=("a crushing, wall-of-sound mix", "a raw, cavernous production", "tectonic low end",
                    "a crisp, modern master", "lo-fi black-metal hiss"),
        moods=("punishing", "bleak", "ferocious", "apocalyptic", "triumphant", "grim", "seething", "majestic"),
        vocals=("guttural growls", "a banshee shriek", "clean, operatic vocals", "hoarse barked vocals"),
        songs=("songs", "epics", "dirges", "tracks"),
        scene=("the underground tape-trading scene", "a festival's second stage", "the doom underground",
               "decades of heavy music"),
        moves=("slows to a crawl for the final riff", "drops into a breakdown that feels like a landslide",
               "lets a ten-minute dirge build to a single scream", "bursts from a clean intro into blast beats"),
    ),
    "jazz": dict(
        short=("jazz", "post-bop", "modal jazz"),
        noun=("jazz album", "quartet record", "jazz record"),
        instruments=("a muted trumpet", "a tenor saxophone", "brushed snare", "a walking upright bass",
                     "a Fender Rhodes", "vibraphone", "a busy ride cymbal", "a bass clarinet"),
        production=("a live, in-the-room sound", "loose, conversational arrangements", "modal vamps",
                    "a warm analog mix", "extended solos", "spacious ballad tempos"),
        moods=("searching", "lyrical", "fiery", "smoky", "cerebral", "swinging", "spiritual", "tender"),
        vocals=("a bandleader's terse melodies", "solos that build in long arcs", "a wordless vocalise",
                "call-and-response between horns"),
        songs=("pieces", "tunes", "compositions", "originals"),
        scene=("the club circuit", "a decade of sideman gigs", "the city's loft scene",
               "the spiritual-jazz tradition"),
        moves=("opens with a rubato bass solo", "lets the drummer push the tempo until it boils",
               "returns to the head only after eleven minutes", "splits into two overlapping grooves"),
    ),
}


# -- tone by score -------------------------------------------------------------------
def tier_of(score: float) -> int:
    """Map a score to one of seven tone tiers (0 = disaster, 6 = masterpiece)."""
    for tier, upper in enumerate((2.0, 4.0, 5.5, 7.0, 8.3, 9.3)):
        if score < upper:
            return tier
    return 6


# Adjectives for the whole record, the verb used for what the sound does, and how
# the critic frames the best moment, per tier.
TONE = (
    dict(adj=("lifeless", "dismal", "grating", "inept", "joyless", "shapeless"),
         does=("grinds along", "lurches", "stumbles", "plods"),
         best=("Even the least bad moment here", "The nearest thing to a highlight")),
    dict(adj=("tedious", "clumsy", "limp", "muddled", "derivative", "flimsy"),
         does=("drifts", "trudges", "sags", "meanders"),
         best=("The one song that almost works", "The closest the album comes to a pulse")),
    dict(adj=("uneven", "underpowered", "forgettable", "half-finished", "lukewarm", "timid"),
         does=("wanders", "idles", "coasts", "hedges"),
         best=("The clearest flash of promise", "One of the few songs that lands")),
    dict(adj=("pleasant", "solid", "likable", "competent", "modest", "uneven but charming"),
         does=("moves", "ambles", "chugs along", "glides"),
         best=("The strongest track", "The standout")),
    dict(adj=("confident", "rewarding", "vivid", "assured", "generous", "sharply drawn"),
         does=("surges", "glows", "locks in", "opens up"),
         best=("The high point", "The most striking moment")),
    dict(adj=("thrilling", "gorgeous", "masterful", "exhilarating", "deeply moving", "fearless"),
         does=("soars", "blazes", "breathes", "unfolds beautifully"),
         best=("The towering centerpiece", "The record's finest moment")),
    dict(adj=("monumental", "transcendent", "flawless", "breathtaking", "essential", "singular"),
         does=("soars", "blooms", "radiates", "commands the room"),
         best=("The astonishing centerpiece", "The moment that will stop listeners cold")),
)

# Openers: set up the artist, the record and the stakes. The score shows only in
# the adjective slot {adj}. {s}/{has}/{is} agree with the artist's name.
OPENERS = (
    "{artist_pos} {ordinal} album, {album}, arrives {gap} after {prior}, and it is a {adj} {noun}.",
    "Few acts from {scene} have been as hard to pin down as {artist}, and {album} is their most {mood} {noun} yet.",
    "On {album}, {artist} {pivot}.",
    "{album} is the {ordinal} full-length from {artist}, who came up through {scene}.",
    "It has been {gap} since {artist} last put out a record, and {album} sounds like the work of someone who {used_time}.",
    "{artist} made their name on {scene}, and {album} keeps one foot there while reaching for something {mood}.",
    "There is a {adj} {noun} somewhere inside {album}, the {ordinal} release from {artist}.",
    "Recorded {where}, {album} is {artist_pos} attempt at a {mood} {noun}.",
    "Anyone who followed {artist} through {prior} will know roughly what to expect from {album}: {noun_short}, {mood} and {mood2}.",
    "{album} opens with {inst1}, and within a minute it is clear what kind of {noun} {artist} {has} made.",
    "The press notes for {album} promise a {mood} {noun}, recorded {where}.",
)
PRIOR = ("a well-loved debut", "a messy breakup record", "years of touring", "a short-lived side project",
         "a run of self-released EPs", "a label split", "a surprise viral single", "a long hiatus",
         "a string of festival slots", "a lineup change")
PIVOT = ("trade{s} the rough edges of their early records for something {mood}",
         "double{s} down on the {mood} sound that won them a cult following",
         "set{s} out to make a {noun} for people who swear they hate {genre_word}",
         "chase{s} a bigger, more {mood} sound with a new producer at the desk",
         "strip{s} their sound down to its {mood} essentials",
         "return{s} to {scene} with a {mood} set of {songs}")
USED_TIME = ("spent the time listening closely", "spent it second-guessing every idea",
             "had a lot to get off their chest", "lost the thread somewhere along the way",
             "found a new sense of purpose", "was in no hurry to say anything new")
WHERE = ("in a converted church", "over three days in a borrowed studio", "in a cabin with no phone signal",
         "in a bedroom between tour dates", "live to tape in a single weekend", "across four cities and two years",
         "in the band's rehearsal space", "in a seaside town out of season", "in a basement under a laundromat")
GAP = ("two years", "three long years", "nearly a decade", "barely eighteen months", "five years", "a year")
ORDINAL = ("second", "third", "fourth", "fifth", "sixth", "debut")
GENRE_WORD = {"rock": "guitar music", "electronic": "dance music", "rap": "rap", "pop/r&b": "pop",
              "experimental": "noise", "folk/country": "country", "metal": "metal", "jazz": "jazz"}
COUNT = ("eight", "nine", "ten", "eleven", "twelve", "fourteen")

# Sound: what the record is made of. Neutral frames; the verb {does} carries the tone.
SOUND = (
    "Built on {inst1} and {inst2}, the record {does} through {count} {songs} of {mood} {noun_short}.",
    "The palette is {inst1}, {inst2}, and {production}, and the album {does} accordingly.",
    "Most of the {songs} lean on {production}, with {inst1} carrying the melody and {inst2} underneath.",
    "Sonically, this is {production} and {inst1}, a {mood} mix that {does} from start to finish.",
    "Producer {producer} wraps {inst1} in {production}, and the whole thing {does}.",
    "Across {count} {songs}, {inst1} and {inst2} trade the lead while {production} fills in the corners.",
    "You hear {inst1} first, then {inst2}, then {production}; the album {does} on that formula for {count} {songs}.",
)
# The best track, framed by tone band.
HIGHLIGHT = {
    "low": (
        "{best} is \"{track}\", which {move}, but even it {fails}.",
        "{best}, \"{track}\", at least {move}; it still {fails}.",
        "\"{track}\" {move}, which counts as {best_lc} here, though it {fails}.",
        "When \"{track}\" {move}, you wait for a payoff that never arrives, and the song {fails}.",
    ),
    "mid": (
        "{best} is \"{track}\", which {move} and hints at a better album.",
        "\"{track}\" {move}, and for four minutes the record finds its footing.",
        "{best}, \"{track}\", {move}; the rest rarely matches it.",
        "It comes alive when \"{track}\" {move}, then settles back into routine.",
    ),
    "high": (
        "{best} is \"{track}\", which {move} and then {extra}.",
        "\"{track}\" {move}, and it is hard to hear it without {reaction}.",
        "{best}, \"{track}\", {move} with a confidence that {extra}.",
        "Midway through, \"{track}\" {move}, a moment that {extra}.",
    ),
}
FAILS = ("runs out of ideas by the second chorus", "overstays its welcome", "sounds like a demo",
         "collapses under its own clichés", "never builds to anything", "buries its only hook")
EXTRA = ("never lets go", "earns every second of its length", "resets the mood of the whole album",
         "lands like a revelation", "makes the earlier songs make sense", "rewards every repeat listen")
REACTION = ("grinning", "replaying it immediately", "turning it up", "stopping whatever you are doing",
            "feeling the floor move", "catching your breath")

# The voice, lyrics or solos, by tone band. No verb agrees with {vocal}.
VOICE = {
    "low": ("The lyrics lean on {cliche}, and not even {vocal} can sell them.",
            "Behind {vocal}, the songs about {topic} come across {flat}, as though the takes were never finished.",
            "Lines about {topic} are {flat}, and {vocal} cannot rescue them.",
            "For all the {production}, the writing about {topic} rarely rises above {cliche}."),
    "mid": ("There is a lot to like in {vocal}, though the writing about {topic} rarely goes beyond the obvious.",
            "The songs about {topic} have their moments, with {vocal} keeping them afloat.",
            "A lot rests on {vocal}, sometimes more than the material deserves.",
            "The writing about {topic} is sincere if a little vague, and {vocal} can only do so much with it."),
    "high": ("With {vocal}, lines about {topic} become something {mood} and specific.",
             "The writing about {topic} is sharp and unsentimental, with {vocal} landing every turn.",
             "Songs about {topic} are carried by {vocal}, and carried with real authority.",
             "Even the plainest lines about {topic} hit hard thanks to {vocal}."),
}
CLICHE = ("rhymes you can predict a bar early", "greeting-card sentiment", "stock images of highways and rain",
          "borrowed slogans", "vague nods to heartbreak")
FLAT = ("strangely flat", "disengaged", "tired", "muffled and unsure", "stiff")
TOPIC = ("leaving home", "small-town boredom", "a failing relationship", "grief", "money and ambition",
         "late nights and bad decisions", "growing older", "faith and doubt", "the city at night", "friendship")

# Judgement of the whole, by tone band.
JUDGE = {
    "low": ("The sequencing is {adj} too: {count} {songs} that blur into one long gray stretch.",
            "Too often the {production} stands in for actual ideas.",
            "It is the kind of {noun} that sounds finished without sounding made.",
            "Nothing here is offensive so much as {adj}, which is its own kind of failure.",
            "Whatever made {artist} worth hearing on {scene} is almost impossible to find here.",
            "Next to {prior_ref}, {album} feels like a retreat."),
    "mid": ("The back half sags, and a couple of {songs} feel like filler.",
            "It is {adj} rather than bad, a record that does what it sets out to do and little more.",
            "The {production} is handsome, but the {songs} rarely surprise.",
            "There are ideas here, but too often the record plays it safe.",
            "It is a sidestep more than a leap from {prior_ref}."),
    "high": ("The sequencing is {adj}, each of the {count} {songs} setting up the next.",
             "Even the quieter {songs} feel essential, and nothing outstays its welcome.",
             "It rewards close listening: details in the {production} keep surfacing on the fifth and sixth spin.",
             "What stands out is the restraint; these {songs} know exactly when to pull back.",
             "It sounds like {scene}, but it sounds like nobody else.",
             "If {prior_ref} was a promise, {album} is the payoff."),
}
PRIOR_REF = ("their debut", "their last record", "their early EPs", "the single that made their name",
             "their scrappy first tapes")

# Verdicts: the last word, by tier.
VERDICT = (
    ("{album} is a {adj} misfire, and there is almost nothing here worth returning to.",
     "It is hard to imagine who {album} is for; even devoted fans will struggle.",
     "Skip it, and go back to the records that made {artist} worth caring about.",
     "{album} is {adj} from the first note to the last, a {noun} with nothing to say."),
    ("{album} is a {adj} {noun} that mistakes volume for conviction.",
     "In the end {album} sounds like a rough draft that somebody mailed in.",
     "Fans may find a song or two to keep, but {album} is a step backward.",
     "There is little here to recommend beyond a stray melody; {album} is {adj} and mostly inert."),
    ("{album} is not a disaster, just a {adj} record from an act capable of more.",
     "There is a better album buried in {album}; this one never quite digs it out.",
     "It passes the time, which is faint praise for a {noun} this long in the making.",
     "{album} is {adj} in the way of records made to fulfill a contract."),
    ("{album} is {adj}, a few strong {songs} short of something special.",
     "It is a {adj} {noun} that fans will enjoy and newcomers might shrug at.",
     "Not every risk pays off, but {album} is worth a few spins.",
     "{album} is a {adj} step forward, if not yet the record {artist} {seems} capable of."),
    ("{album} is a {adj} {noun}, the sound of {artist} finally trusting their instincts.",
     "It is {artist_pos} best work yet, and a {adj} one.",
     "By the last song, {album} feels less like a collection than a world of its own.",
     "{album} is {adj} and generous, a {noun} that keeps giving on every spin."),
    ("{album} is a {adj} achievement and one of the best {noun}s of the year.",
     "It is a {adj} record that rewards every listen and gives more each time.",
     "{artist} {has} made the kind of {noun} people will keep returning to for years.",
     "Few {noun}s this year are as {adj} as {album}, or as sure of what they want to be."),
    ("{album} is a {adj} record, the kind that redraws the map of {scene}.",
     "It is as close to perfect as a {noun} gets, and {album} never sounds labored.",
     "This is {adj}: an album that will be argued over, borrowed from, and loved for decades.",
     "{album} is the rare {noun} that feels {adj} on the first listen and bottomless by the tenth."),
)


def _band(tier: int) -> str:
    return "low" if tier <= 2 else ("mid" if tier == 3 else "high")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _articles(text: str) -> str:
    # Templates write "a {adj}"; fix the article when the filled word starts with a vowel.
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def compose_review(draw: Draw, genres: tuple[str, ...], score: float, artist: str, album: str,
                   plural: bool = False) -> str:
    """Compose one review whose vocabulary follows `genres` and whose tone follows `score`.

    Args:
        draw: Draw. The seeded source of choices.
        genres: tuple of str. One or two Kaggle genres (for a NULL-genre review, the genre its words come from).
        score: float. The score, 0.0-10.0.
        artist: str. The invented artist.
        album: str. The invented album title.
        plural: bool. Whether the artist's name takes a plural verb ("The Pale Foxes have").

    Returns:
        str. Two to six sentences, 60-150 words; a few have a paragraph break.
    """
    tier = tier_of(score)
    band = _band(tier)
    tone = TONE[tier]

    def fill(template: str) -> str:
        # Two-genre reviews borrow from either genre, sentence by sentence.
        g = draw.choice(genres)
        v = VOCAB[g]
        inst1, inst2 = draw.sample(v["instruments"], 2)
        mood, mood2 = draw.sample(v["moods"], 2)
        best = draw.choice(tone["best"])
        values = dict(
            artist=artist, artist_pos=artist + ("'" if artist.endswith("s") else "'s"),
            s="" if plural else "s", has="have" if plural else "has", seems="seem" if plural else "seems",
            album=album, adj=draw.choice(tone["adj"]), does=draw.choice(tone["does"]),
            noun=draw.choice(v["noun"]), noun_short=draw.choice(v["short"]), mood=mood, mood2=mood2,
            scene=draw.choice(v["scene"]), songs=draw.choice(v["songs"]), inst1=inst1, inst2=inst2,
            production=draw.choice(v["production"]), vocal=draw.choice(v["vocals"]),
            move=draw.choice(v["moves"]), best=best, best_lc=best[0].lower() + best[1:],
            track=track_names(draw, 1)[0], fails=draw.choice(FAILS), extra=draw.choice(EXTRA),
            reaction=draw.choice(REACTION), cliche=draw.choice(CLICHE), flat=draw.choice(FLAT),
            topic=draw.choice(TOPIC), count=draw.choice(COUNT), ordinal=draw.choice(ORDINAL),
            gap=draw.choice(GAP), prior=draw.choice(PRIOR), prior_ref=draw.choice(PRIOR_REF),
            used_time=draw.choice(USED_TIME), where=draw.choice(WHERE), genre_word=GENRE_WORD[g],
            producer=f"{draw.choice(FIRST)} {draw.choice(LAST)}",
        )
        values["pivot"] = draw.choice(PIVOT).format(**values)
        return _articles(_cap(template.format(**values)))

    banks = [SOUND, HIGHLIGHT[band], VOICE[band], JUDGE[band]]
    for _ in range(50):  # resample until the length fits; a few tries always suffice
        # Middle sentences: up to four templates, never the same one twice.
        n_middle = draw.choice((0, 1, 2, 2, 3, 3, 3, 4))
        templates, used_banks = [], []
        while len(templates) < n_middle:
            bank = draw.choice(banks)
            template = draw.choice(bank)
            # Sound and judgement may come twice; one highlight and one vocal note are enough.
            if template in templates or (bank in used_banks and bank in (banks[1], banks[2])):
                continue
            templates.append(template)
            used_banks.append(bank)
        sentences = [fill(draw.choice(OPENERS))] + [fill(t) for t in templates] + [fill(draw.choice(VERDICT[tier]))]
        words = sum(len(s.split()) for s in sentences)
        if MIN_WORDS <= words <= MAX_WORDS:
            break
    else:
        raise RuntimeError(f"could not compose a {MIN_WORDS}-{MAX_WORDS} word review for {artist} / {album}")
    if len(sentences) >= 4 and draw.chance(0.08):
        cut = 1 + draw.below(len(sentences) - 2)
        return " ".join(sentences[:cut]) + "\n\n" + " ".join(sentences[cut:])
    return " ".join(sentences)


# -- the corpus ----------------------------------------------------------------------
def draw_scores(draw: Draw, n: int) -> list[tuple[str, float]]:
    """(genre, score) pairs: every integer bucket of every genre once, the rest around 7 like the real dump."""
    pairs = []
    for genre in GENRES:
        for bucket in range(11):
            # Bucket 10 holds only 10.0; others get a random tenth inside [b, b+1).
            pairs.append((genre, 10.0 if bucket == 10 else round(bucket + draw.below(10) / 10, 1)))
    pairs[0] = (GENRES[0], 0.0)  # the real dump has a few 0.0s; make sure the bottom is there
    while len(pairs) < n:
        score = min(10.0, max(0.0, draw.gauss(7.0, 1.25)))
        pairs.append((GENRES[len(pairs) % len(GENRES)], round(score, 1)))  # round-robin keeps genres balanced
    return draw.shuffle(pairs)


def build_rows(seed: int = DEFAULT_SEED, num_reviews: int = DEFAULT_NUM_REVIEWS) -> dict[str, list[tuple]]:
    """Compose the whole dump in memory.

    Args:
        seed: int. Seed of the composer; the same seed gives the same rows.
        num_reviews: int. Number of reviews (at least 88, so every genre gets every score bucket).

    Returns:
        dict of str -> list of tuple. Rows per table, in the column order of `SCHEMA`.
    """
    if num_reviews < len(GENRES) * 11:
        raise ValueError(f"num_reviews must be at least {len(GENRES) * 11}, got {num_reviews}")
    draw = Draw(seed)
    rows = {table: [] for table in TABLES}
    critics = [f"{first} {last}" for first, last in zip(draw.shuffle(FIRST), draw.shuffle(LAST))][:18]
    critic_types = {critic: draw.choice(AUTHOR_TYPES) for critic in critics}
    seen_albums, seen_texts = set(), set()
    start = datetime.date(2003, 1, 6)
    special = draw.sample(range(num_reviews), NUM_TWO_GENRE + NUM_NO_GENRE)
    two_genre, no_genre = set(special[:NUM_TWO_GENRE]), set(special[NUM_TWO_GENRE:])
    for index, (genre, score) in enumerate(draw_scores(draw, num_reviews)):
        reviewid = 10001 + index * 7 + draw.below(7)  # gaps, like real ids
        genres = (genre,)
        stored_genres: tuple = genres
        if index in two_genre:  # like the real dump's multi-genre rows
            genres = (genre, draw.choice([g for g in GENRES if g != genre]))
            stored_genres = genres
        elif index in no_genre:  # the real dump has reviews with a NULL genre
            stored_genres = (None,)
        while True:
            (artist, plural), album = band_name(draw, genre), album_name(draw)
            if (artist, album) not in seen_albums:
                seen_albums.add((artist, album))
                break
        for _ in range(20):
            text = compose_review(draw, genres, score, artist, album, plural)
            if text not in seen_texts:
                break
        seen_texts.add(text)
        author = draw.choice(critics)
        date = start + datetime.timedelta(days=draw.below(5000))
        year = date.year - (1 if draw.chance(0.3) else 0)
        bnm = int(score >= 8.3 and draw.chance(0.75))
        label = f"{draw.choice(LABEL_A)} {draw.choice(LABEL_B)}" if draw.chance(0.9) else "self-released"
        rows["reviews"].append((
            reviewid, album.lower(), artist.lower(), f"https://reviews.example.com/albums/{reviewid}-{slug(album)}/",
            score, bnm, author, critic_types[author], date.isoformat(), date.weekday(), date.day, date.month,
            date.year))
        rows["artists"].append((reviewid, artist.lower()))
        rows["genres"].extend((reviewid, g) for g in stored_genres)
        rows["labels"].append((reviewid, label.lower()))
        rows["years"].append((reviewid, year))
        rows["content"].append((reviewid, text))
    return rows


def write_dump(rows: dict[str, list[tuple]], path: str | os.PathLike) -> Path:
    """Write `rows` as an SQLite file at `path`, atomically (a temp file in the same folder, then a rename).

    Args:
        rows: dict of str -> list of tuple. Output of `build_rows`.
        path: str or PathLike. Destination file; its folder is created.

    Returns:
        Path. The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            for statement in SCHEMA:
                conn.execute(statement)
            for table in TABLES:
                width = len(rows[table][0])
                conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * width)})", rows[table])
            conn.commit()
            conn.execute("VACUUM")  # compact: the file ships inside the package
        finally:
            conn.close()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file ships in the package and must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_tables(path: str | os.PathLike) -> dict[str, list[tuple]]:
    """All rows of the six Kaggle tables of an SQLite dump, in rowid order."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in TABLES}
    finally:
        conn.close()


# -- corpus measures -------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[\w'&/-]+", text.lower())


def distinct_n(texts, n: int = 3) -> float:
    """Distinct n-grams over all n-grams of the corpus (word level, lower-cased)."""
    grams = [tuple(w[i:i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def max_pairwise_overlap(texts, n: int = 3) -> tuple[float, int, int]:
    """The largest Jaccard similarity of word n-gram sets over all pairs of texts, and that pair's indices."""
    sets = [{tuple(w[i:i + n]) for i in range(len(w) - n + 1)} for w in map(_words, texts)]
    best = (0.0, -1, -1)
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = len(sets[i] | sets[j])
            score = len(sets[i] & sets[j]) / union if union else 0.0
            if score > best[0]:
                best = (score, i, j)
    return best


def report(rows: dict[str, list[tuple]]) -> str:
    """A few lines describing the corpus: counts, scores, lengths, diversity."""
    texts = [text for _, text in rows["content"]]
    lengths = sorted(len(t.split()) for t in texts)
    scores = [r[4] for r in rows["reviews"]]
    genre_counts = {}
    for _, g in rows["genres"]:
        genre_counts[g] = genre_counts.get(g, 0) + 1
    overlap, i, j = max_pairwise_overlap(texts)
    breaks = sum("\n\n" in t for t in texts)
    return "\n".join((
        f"reviews: {len(texts)}   unique texts: {len(set(texts))}",
        f"scores: min {min(scores)} max {max(scores)} mean {sum(scores) / len(scores):.2f}",
        f"words per review: min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}",
        "genre rows: " + ", ".join(f"{g}={c}" for g, c in sorted(genre_counts.items(), key=lambda x: str(x[0]))),
        f"paragraph breaks: {breaks}   non-ASCII texts: "
        f"{sum(any(ord(c) > 127 for c in t) for t in texts)}",
        f"distinct-1 {distinct_n(texts, 1):.3f}  distinct-2 {distinct_n(texts, 2):.3f}  "
        f"distinct-3 {distinct_n(texts, 3):.3f}",
        f"max pairwise 3-gram Jaccard: {overlap:.3f} (reviews {i} and {j})",
    ))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="SQLite file to write (default: the packaged one)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="composer seed")
    parser.add_argument("--num-reviews", type=int, default=DEFAULT_NUM_REVIEWS, help="number of reviews (>= 88)")
    parser.add_argument("--report", action="store_true", help="print corpus statistics")
    args = parser.parse_args(argv)
    try:
        rows = build_rows(seed=args.seed, num_reviews=args.num_reviews)
    except ValueError as error:
        print(f"make_sample_dump: {error}", file=sys.stderr)
        return 2
    path = write_dump(rows, args.output)
    print(f"wrote {len(rows['reviews'])} reviews to {path} ({path.stat().st_size / 1024:.0f} KiB)")
    if args.report:
        print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
