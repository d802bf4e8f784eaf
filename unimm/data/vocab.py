"""The closed world of the embedded scenes: shapes, colours, backgrounds, numbers.

Object colours are saturated and backgrounds are neutral (grey levels), so a
pixel's hue names its object colour whatever the background, and mixing with the
background (anti-aliasing, blur) changes chroma but not hue. The checkers rely on
this; keep new colours saturated and far apart in hue.
"""

SHAPES = ("circle", "square", "triangle", "diamond")

# name -> sRGB. Hues: red 0, orange 32, yellow 54, green 129, blue 223, purple 277 deg.
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (35, 85, 225),
    "purple": (145, 55, 200),
}

BACKGROUNDS = {
    "white": (255, 255, 255),
    "light_grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "black": (0, 0, 0),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

RELATIONS = ("left of", "right of", "above", "below")
# How a relation reads in text ("a circle to the left of a square").
RELATION_TEXT = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

MAX_OBJECTS = 4


def plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
