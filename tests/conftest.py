"""Put the repository on sys.path, so the tests import Wyrd's modules."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

