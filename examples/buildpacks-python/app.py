import json
import os

import six

app = json.loads(os.environ["VCAP_APPLICATION"])
print(f"{os.environ['GREETING']} from {app['name']} (six {six.__version__}, memory {app['limits']['mem']})")
