"""Build script: the Cython fast paths, linked against pyzmq's own libzmq.

Metadata lives in pyproject.toml; this file adds what needs code:

* the extension modules, ``zmq_cluster._fastpath.<name>`` built from
  ``src/_fastpath/<name>.pyx`` for each name in ``FASTPATH_MODULES``;
* linking them against the very libzmq that pyzmq loads, so that a process
  never maps two libzmq copies: pyzmq's bundled ``pyzmq.libs/libzmq-*.so*``
  when it has one (rpath ``$ORIGIN``-relative for an install, plus absolute
  for an editable one), else the system ``-lzmq`` pyzmq was built against;
* the pyzmq pin: the extension is tied to the pyzmq it was compiled against
  (the bundled library's hashed file name, the layout of ``zmq.Frame``), so
  the built package requires exactly that pyzmq version.

``ZMQ_CLUSTER_NO_EXTENSIONS=1`` builds a pure-Python package. Otherwise a
failure to build an extension fails the build: there is no silent fallback.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

#: Compiled modules: src/_fastpath/<name>.pyx -> zmq_cluster._fastpath.<name>.
#: Adding one is adding its name here.
FASTPATH_MODULES = ["framing", "wire"]

HERE = os.path.dirname(os.path.abspath(__file__))
FASTPATH_SRC = os.path.join("src", "_fastpath")
#: Where an installed extension sits below site-packages
#: (site-packages/zmq_cluster/_fastpath/<name>.so).
INSTALL_DEPTH = 2

NO_EXTENSIONS = os.environ.get("ZMQ_CLUSTER_NO_EXTENSIONS", "") not in ("", "0")


class BuildError(SystemExit):
    """Stops the build with a message meant for a person."""

    def __init__(self, message):
        super().__init__("\nzmq-cluster build error: %s\n" % message)


def _readelf_dynamic(path):
    """(NEEDED names, RPATH/RUNPATH dirs) of a shared object, or None when
    readelf is not available."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", path], check=True, capture_output=True,
                         text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    rpaths = []
    for entry in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]",
                            out):
        rpaths.extend(p for p in entry.split(":") if p)
    origin = os.path.dirname(os.path.abspath(path))
    rpaths = [os.path.normpath(p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
              for p in rpaths]
    return needed, rpaths


def find_pyzmq_libzmq():
    """How pyzmq gets its libzmq.

    Returns ``("bundled", directory, file name)`` for a copy shipped inside
    the pyzmq distribution (its wheels: ``site-packages/pyzmq.libs``), or
    ``("system", None, soname)`` for a libzmq found by the system linker.
    """
    import zmq

    zmq_dir = os.path.dirname(os.path.abspath(zmq.__file__))
    site_dir = os.path.dirname(zmq_dir)
    backends = sorted(glob.glob(os.path.join(zmq_dir, "backend", "cython", "_zmq*.so")))
    if not backends:
        raise BuildError("pyzmq at %s has no compiled Cython backend "
                         "(zmq/backend/cython/_zmq*.so); install a pyzmq wheel" % zmq_dir)
    dynamic = _readelf_dynamic(backends[0])
    if dynamic is not None:
        needed, rpaths = dynamic
        names = [n for n in needed if n.startswith("libzmq")]
        if not names:
            raise BuildError(
                "%s does not link libzmq dynamically (static libzmq inside pyzmq?): "
                "the extension could not share pyzmq's libzmq. Use a pyzmq wheel, or a "
                "pyzmq built against a shared system libzmq." % backends[0])
        name = names[0]
        for directory in rpaths + [os.path.join(site_dir, "pyzmq.libs")]:
            if os.path.isfile(os.path.join(directory, name)):
                return "bundled", directory, name
        return "system", None, name
    # No readelf (binutils): look for the copy auditwheel puts beside zmq.
    bundled = sorted(glob.glob(os.path.join(site_dir, "pyzmq.libs", "libzmq*.so*")))
    if bundled:
        return "bundled", os.path.dirname(bundled[0]), os.path.basename(bundled[0])
    return "system", None, "libzmq.so"


def find_zmq_h():
    """The directory holding the system's zmq.h (pyzmq's wheels do not ship it)."""
    candidates = []
    for var in ("ZMQ_CLUSTER_ZMQ_INCLUDE", "CPATH", "C_INCLUDE_PATH"):
        candidates.extend(p for p in os.environ.get(var, "").split(os.pathsep) if p)
    candidates += [sysconfig.get_paths()["include"], os.path.join(sys.prefix, "include"),
                   "/usr/local/include", "/usr/include"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        candidates.append(os.path.join("/usr/include", multiarch))
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "zmq.h")):
            return directory
    raise BuildError(
        "zmq.h not found (looked in %s). The Cython extension is compiled against "
        "libzmq's header, which pyzmq's wheels do not ship: install it with "
        "`apt-get install libzmq3-dev` (Debian/Ubuntu; `sudo` unless root), or set "
        "ZMQ_CLUSTER_ZMQ_INCLUDE to the directory holding zmq.h, or build the pure-Python "
        "package with ZMQ_CLUSTER_NO_EXTENSIONS=1." % ", ".join(candidates))


def make_extensions():
    try:
        import numpy
        import zmq
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as exc:
        raise BuildError("building the extensions needs Cython>=3, numpy and pyzmq in the "
                         "build environment (%s). With pip's build isolation they come from "
                         "pyproject.toml; with --no-build-isolation install them first." % exc)

    zmq_include = find_zmq_h()
    kind, libdir, libname = find_pyzmq_libzmq()
    if kind == "bundled":
        site_dir = os.path.dirname(os.path.dirname(os.path.abspath(zmq.__file__)))
        relative = os.path.relpath(libdir, site_dir)
        origin = "$ORIGIN/" + "/".join([".."] * INSTALL_DEPTH + [relative])
        link_args = ["-L" + libdir, "-l:" + libname,
                     "-Wl,-rpath," + origin, "-Wl,-rpath," + libdir]
        libraries = []
        print("zmq-cluster: linking pyzmq's bundled %s (rpath %s and %s)"
              % (os.path.join(libdir, libname), origin, libdir))
    else:
        link_args = []
        libraries = ["zmq"]
        print("zmq-cluster: pyzmq uses the system %s; linking -lzmq" % libname)

    include_dirs = [numpy.get_include(), *zmq.get_includes(), zmq_include]
    extensions = [
        Extension(
            "zmq_cluster._fastpath." + name,
            [os.path.join(FASTPATH_SRC, name + ".pyx")],
            include_dirs=include_dirs,
            libraries=libraries,
            extra_link_args=link_args,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3"],
        )
        for name in FASTPATH_MODULES
    ]
    return cythonize(extensions, compiler_directives={"language_level": "3"},
                     include_path=[os.path.dirname(os.path.dirname(zmq.__file__))])


#: Run-time requirements besides pyzmq: tomli reads the config file on
#: Pythons older than 3.11 (later ones have tomllib); cloudpickle sends
#: functions by value (lambdas, closures, __main__); tqdm draws the pool's
#: progress bars. See README, "Dependencies".
COMMON_REQUIRES = ["numpy", 'tomli; python_version < "3.11"', "cloudpickle", "tqdm"]


def install_requires():
    if NO_EXTENSIONS:
        return ["pyzmq"] + COMMON_REQUIRES
    import zmq

    # The extension links pyzmq's bundled libzmq by its hashed file name and
    # cimports zmq.Frame's layout: both belong to this exact pyzmq release.
    return ["pyzmq==%s" % zmq.__version__] + COMMON_REQUIRES


if NO_EXTENSIONS:
    print("zmq-cluster: ZMQ_CLUSTER_NO_EXTENSIONS is set: pure-Python build, no extensions")
    ext_modules = []
else:
    os.chdir(HERE)  # cythonize and the sources use paths relative to the project
    ext_modules = make_extensions()

setup(
    ext_modules=ext_modules,
    install_requires=install_requires(),
)
