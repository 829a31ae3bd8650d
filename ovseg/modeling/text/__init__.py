from .text_classifier import TextClassifier, max_over_synonyms
from .vocabulary import (
    TEMPLATE_SETS,
    Vocabulary,
    dataset_vocabulary,
    get_templates,
    is_registered_dataset,
    make_vocabulary,
    parse_vocabulary,
)

__all__ = ["TEMPLATE_SETS", "TextClassifier", "Vocabulary", "dataset_vocabulary", "get_templates",
           "is_registered_dataset", "make_vocabulary", "max_over_synonyms", "parse_vocabulary"]
