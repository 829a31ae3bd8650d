from .text_classifier import TextClassifier, max_over_synonyms
from .vocabulary import (
    TEMPLATE_SETS,
    Vocabulary,
    VocabularyMixin,
    get_templates,
    make_vocabulary,
    parse_vocabulary,
)

__all__ = ["TEMPLATE_SETS", "TextClassifier", "Vocabulary", "VocabularyMixin", "get_templates", "make_vocabulary",
           "max_over_synonyms", "parse_vocabulary"]
