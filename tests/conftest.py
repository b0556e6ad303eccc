import sys
from pathlib import Path

# Test helpers live beside the tests, not in the installed package.
sys.path.insert(0, str(Path(__file__).parent))
