from .text_classifier import TextClassifier
from .vocabulary import (
    TEMPLATE_SETS,
    Vocabulary,
    VocabularyMixin,
    get_templates,
    make_vocabulary,
    parse_vocabulary,
)

__all__ = ["TEMPLATE_SETS", "TextClassifier", "Vocabulary", "VocabularyMixin", "get_templates", "make_vocabulary",
           "parse_vocabulary"]
