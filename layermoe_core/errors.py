"""One exception type for bad user input, so callers (CLI, flows) can tell it from a bug."""

from typing import Any


class LayerMoEError(ValueError):
    """Bad input to layermoe. The message names the offending value and how to fix it."""


def describe_validation_error(error: Any, model: Any = None, root: str = "<input>") -> str:
    """A pydantic `ValidationError`, one problem per `; `-joined part: `field: message`.

    `root` names an error of the whole input (a model validator's). With `model`, the pydantic class
    validated, a part names the value too and ends with the fix: `field=value: message (fix)`, the fix
    being the field's description, or the fields an unknown key could be.
    (Duck-typed on `error.errors()`, so this module imports nothing and the CLI starts fast.)
    """
    problems = []
    for problem in error.errors():
        loc = problem["loc"]
        name = ".".join(str(part) for part in loc) or root
        value = problem.get("input")
        shown, fix = name, ""
        if model is not None:
            shown = f"{name}={value!r}" if loc and not isinstance(value, dict | list) else name
            field = model.model_fields.get(str(loc[0])) if loc else None
            if problem["type"] == "extra_forbidden":
                fix = f" (remove it; {model.__name__} accepts {', '.join(model.model_fields)})"
            elif field is not None and field.description:
                fix = f" ({name} is {field.description})"
            else:
                fix = f" (see {model.__name__}'s fields)"
        problems.append(f"{shown}: {problem['msg']}{fix}")
    return "; ".join(problems)
