# Installs the build into a fresh prefix, then configures, builds and runs examples/embed
# against it with find_package(switchyard), as a user of the installed package would.
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed")
endif()
# No installed file may search the working directory for libraries.
execute_process(COMMAND sh ${SOURCE_DIR}/tests/faults/runpath_check.sh ${WORK_DIR}/prefix
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "an installed file has an empty RUNPATH entry")
endif()
set(flags)
if(SANITIZE)
  # A sanitized libswitchyard needs the program built the same way.
  set(flags "-DCMAKE_CXX_FLAGS=-fsanitize=address,undefined"
            "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/embed -B ${WORK_DIR}/build
                        -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix ${flags}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring examples/embed against the installed package failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building examples/embed failed")
endif()
# Run without the build tree's plugin folder: plugins must come from the install.
execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=SWITCHYARD_PLUGIN_PATH
                        ${WORK_DIR}/build/embed_example
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "embed_example failed with ${rc}")
endif()
if(NOT out MATCHES "max relative difference")
  message(FATAL_ERROR "embed_example did not report its check")
endif()

# The C example (examples/c), C99, against the same installed package.
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/c -B ${WORK_DIR}/c-build
                        -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix ${flags}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring examples/c against the installed package failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/c-build RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building examples/c failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=SWITCHYARD_PLUGIN_PATH
                        ${WORK_DIR}/c-build/moe_forward
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "max relative difference to the dense reference")
  message(FATAL_ERROR "moe_forward failed with ${rc}")
endif()

# The Python module from the install (when it was built), away from the build tree.
if(EXISTS ${WORK_DIR}/prefix/lib/python3/dist-packages/switchyard/__init__.py)
  execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=SWITCHYARD_PLUGIN_PATH
                          PYTHONPATH=${WORK_DIR}/prefix/lib/python3/dist-packages /usr/bin/python3 -c
                          "import numpy as np, switchyard; rt = switchyard.Runtime.from_string('[runtime]\\nranks = 2\\n'); x = np.ones((6, rt.hidden), np.float32); y = rt.forward(x); r = rt.reference_forward(x); print('python from the install:', switchyard.__version__, float(abs(y - r).max()))"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(NOT rc EQUAL 0 OR NOT out MATCHES "python from the install")
    message(FATAL_ERROR "importing switchyard from the install failed")
  endif()
endif()
