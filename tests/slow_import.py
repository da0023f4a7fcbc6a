"""A worker module that takes ``OBANPRO_TEST_IMPORT_DELAY`` seconds to import, so a test can signal a node that is still starting."""

import os
import time

time.sleep(float(os.environ.get("OBANPRO_TEST_IMPORT_DELAY", "0")))
